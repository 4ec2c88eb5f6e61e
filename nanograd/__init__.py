"""nanograd: forward/backward kernel pairs and AdamW, in NumPy or CuPy.

Every kernel is two pure functions side by side: ``<op>_forward(inputs...)``
returns ``(out, cache)`` and ``<op>_backward(dout, cache)`` returns the
gradients of the differentiable inputs, in the order forward takes them
(integer ids and settings such as p or rng get none).  One pair inside
attention.py differs: causal_softmax_forward(preatt) returns att alone,
which is all its backward needs, so causal_softmax_backward(datt, att)
takes it as the cache (the CUDA twin swaps this pair, the walk around it
stays).

These are the reference kernels, the ones to read: plain NumPy (or CuPy,
through get_array_module), no threads, no reused buffers, no GPU dispatch.
nanograd.fast holds the faster twins that train.py runs, each naming the
plain function it replaces and tested equal to it.
"""
from .adamw import AdamW
from .attention import attention_forward, attention_backward
from .backend import get_array_module, get_backend, make_rng, to_host, synchronize
from .cross_entropy import cross_entropy_forward, cross_entropy_backward
from .dropout import dropout_forward, dropout_backward
from .embedding import embedding_forward, embedding_backward
from .layernorm import layernorm_forward, layernorm_backward
from .linear import linear_forward, linear_backward
from .relu import relu_forward, relu_backward
