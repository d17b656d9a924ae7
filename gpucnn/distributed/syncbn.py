"""Sync-BN: every BatchNorm2D of a model normalising with the global batch's statistics."""
import numpy

from .. import backend
from ..nn.batchnorm import BatchNorm2D
from .comm import Communicator, communicator_for
from .world import DistributedError, World


def convert_sync_batchnorm(model, comm_or_world):
    """Give every BatchNorm2D in model the communicator its training statistics are
    summed over (a World: communicator_for(world, the model's array module)); None
    takes it away again. In a world of one nothing changes. Call it after the model
    is on its device; returns model. Equations: gpucnn.functional.batchnorm."""
    comm = comm_or_world
    if isinstance(comm_or_world, World):
        params = model.parameters()
        xp = backend.get_array_module(params[0].data) if params else numpy
        comm = communicator_for(comm_or_world, xp) if comm_or_world.is_distributed else None
    elif comm is not None and not isinstance(comm, Communicator):
        raise DistributedError(f"comm_or_world must be a World, a Communicator or None, got "
                               f"{type(comm_or_world).__name__}")
    if comm is not None and comm.size == 1:
        comm = None
    for m in model.modules():
        if isinstance(m, BatchNorm2D):
            if comm is None:
                vars(m).pop("sync", None)
            else:
                m.sync = comm
    return model
