"""The methods a study compares, one file each, behind one interface (methods/base.py: Method).

METHODS lists them in run order: a cell plan runs zero_shot, then per K iti, random_heads, transfer_heads, lofit
and the other selectors' heads, then lora and reft. A new method: a file with a Method subclass, one line here,
its search space in lofit_ray.config.MethodSpaces, and its name in lofit_ray.config.REPRODUCE_METHODS.
"""
from .base import HeadMethod, Method
from .gates_heads import GatesHeads
from .grad_heads import GradHeads
from .grad_x_act_heads import GradXActHeads
from .iti import Iti
from .lofit import Lofit
from .lora import Lora
from .random_heads import RandomHeads
from .reft import Reft
from .transfer_heads import TransferHeads
from .zero_shot import ZeroShot

METHODS: dict[str, Method] = {m.name: m for m in (ZeroShot(), Iti(), RandomHeads(), TransferHeads(), Lofit(),
                                                   GatesHeads(), GradHeads(), GradXActHeads(), Lora(), Reft())}

__all__ = ["METHODS", "HeadMethod", "Method"]
