"""Residual(body, shortcut): y = body(x) + shortcut(x), the block of ResNets."""
from .. import backend
from .layers import Identity
from .module import Module, _tree_repr, backward_done


class Residual(Module):
    """body(x) + shortcut(x), the shortcut the identity when None.

    Backward sends dy through both branches and adds their input gradients:
    dx = body.backward(dy) + shortcut.backward(dy). state_dict names are
    'body.<...>' and 'shortcut.<...>' (PyTorch-style dotted paths).
    """

    def __init__(self, body, shortcut=None):
        super().__init__()
        for name, m in (("body", body), ("shortcut", shortcut)):
            if m is not None and not isinstance(m, Module):
                raise TypeError(f"Residual {name} must be a Module, got {type(m).__name__}")
        self.body = body
        self.shortcut = shortcut if shortcut is not None else Identity()

    def named_children(self):
        return [("body", self.body), ("shortcut", self.shortcut)]

    def forward(self, x):
        y = self.body.forward(x)
        s = self.shortcut.forward(x)
        if tuple(y.shape) != tuple(s.shape):
            raise ValueError(f"Residual: the body's output has shape {tuple(y.shape)} but the "
                             f"shortcut's has {tuple(s.shape)} (input {tuple(x.shape)}); they "
                             "must match to be added (give the shortcut a strided 1x1 conv)")
        return _add(y, s)

    def backward(self, dy, need_input_grad=True):
        dx = self.body.backward(dy, need_input_grad=need_input_grad)
        backward_done(self.body)
        ds = self.shortcut.backward(dy, need_input_grad=need_input_grad)
        backward_done(self.shortcut)
        if not need_input_grad:
            return None
        return _add(dx, ds)

    def __repr__(self):
        return _tree_repr(self)


def _add(a, b):
    """a + b into a new array, its rows shared out between the CPU threads."""
    xp = backend.get_array_module(a, b)
    return backend.ops_for(xp).rows(xp.add, xp.empty(a.shape, xp.result_type(a, b)), a, b)
