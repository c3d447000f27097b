"""Phase 2 on the heads with the largest sum |dL/dz . z| (gradient times activation): one pass."""
from .grad_heads import GradHeads


class GradXActHeads(GradHeads):
    name = "grad_x_act_heads"
    selector = "grad_x_act"
