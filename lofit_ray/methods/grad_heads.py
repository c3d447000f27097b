"""Phase 2 on the heads with the largest ||dL/dv|| at v = 0: one gradient pass, nothing searched in phase 1."""
import dataclasses

from .base import HeadMethod


class GradHeads(HeadMethod):
    name = "grad_heads"
    selector = "grad"
    logs_ranking = True

    def head_set(self, runner, task, k, seed, params):
        return self.ranked(runner, task, k, seed, dataclasses.replace(runner.cfg.phase1, selector=self.selector))
