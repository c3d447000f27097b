"""LoFiT: phase 1 ranks heads by ||A|| (scales with an L1 penalty), phase 2 trains offsets on the top K."""
import dataclasses

from ..config.sections import optimizer_settings
from .base import HeadMethod


class Lofit(HeadMethod):
    name = "lofit"
    selector = "l1"
    logs_ranking = True

    def setting_part(self, cfg, task: str) -> dict:
        optimizer = optimizer_settings(cfg.phase1)
        return {**super().setting_part(cfg, task), "phase1_epochs": cfg.phase1.epochs,
                **({"phase1_optimizer": optimizer} if optimizer else {})}

    @staticmethod
    def phase1(cfg, params: dict):
        """Phase 1 at a search's lr and L1."""
        return dataclasses.replace(cfg.phase1, selector="l1", lr=float(params["phase1_lr"]), l1=float(params["l1"]))

    def head_set(self, runner, task, k, seed, params):
        head_set, info = self.ranked(runner, task, k, seed, self.phase1(runner.cfg, params))
        lay = runner.loaded.layout
        return head_set, {**info, "phase1_params": lay.num_layers * lay.num_heads * lay.head_dim}
