"""Sync-BN: every BatchNorm2D of a model normalising with the global batch's statistics."""
from ..nn.batchnorm import BatchNorm2D
from .comm import model_communicator


def convert_sync_batchnorm(model, comm_or_world):
    """Give every BatchNorm2D in model the communicator its training statistics are
    summed over (a World: communicator_for(world, the model's array module)); None
    takes it away again. In a world of one nothing changes. Call it after the model
    is on its device; returns model. Equations: gpucnn.functional.batchnorm."""
    comm = None if comm_or_world is None else model_communicator(
        model, comm_or_world, "a World, a Communicator or None")
    if comm is not None and comm.size == 1:
        comm = None
    for m in model.modules():
        if isinstance(m, BatchNorm2D):
            if comm is None:
                vars(m).pop("sync", None)
            else:
                m.sync = comm
    return model
