"""A model onto the mesh, in place: every parameter becomes a DTensor parameter with the
plan's placements (ties kept), then each mesh axis installs what it runs at use: FSDP's
gather (:mod:`.data`) and tensor parallelism's conversion points (:mod:`.tensor`)."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from lowering._torch import own_copy_per_rank
from lowering.parallel.data import install_fsdp
from lowering.parallel.tensor import install_tp_hooks
from lowering.plan import Plan

__all__ = ["distribute_model"]


def distribute_model(model: nn.Module, plan: Plan, dmesh: DeviceMesh) -> nn.Module:
    """Replace every parameter by a DTensor parameter with the plan's placements. A
    pipeline stage's model holds only its own layers; the plan's others are skipped."""
    new: dict[int, nn.Parameter] = {}
    held = dict(model.named_parameters(remove_duplicate=False))
    for p_plan in plan.params:
        if p_plan.name not in held:  # a layer another pipeline stage holds
            continue
        old = held[p_plan.name]
        data = distribute_tensor(old.detach(), dmesh, p_plan.placements, src_data_rank=None)
        local = own_copy_per_rank(data.to_local())
        if local is not data.to_local():
            data = DTensor.from_local(local, dmesh, p_plan.placements, run_check=False,
                                      shape=data.shape, stride=data.stride())
        new[id(old)] = nn.Parameter(data, requires_grad=old.requires_grad)
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and id(p) in new:
                mod._parameters[pname] = new[id(p)]
    install_fsdp(model, plan, dmesh)
    install_tp_hooks(model, plan)
    return model
