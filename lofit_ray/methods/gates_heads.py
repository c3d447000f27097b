"""Phase 2 on the heads JoLA-style HardConcrete gates keep open (phase1.selector gates)."""
import dataclasses

from ..config.sections import optimizer_settings
from .base import HeadMethod


class GatesHeads(HeadMethod):
    name = "gates_heads"
    selector = "gates"
    logs_ranking = True

    def setting_part(self, cfg, task: str) -> dict:
        return {**super().setting_part(cfg, task),
                "phase1": {"epochs": cfg.phase1.epochs, "gate_parts": cfg.phase1.gate_parts,
                           **optimizer_settings(cfg.phase1)}}

    def head_set(self, runner, task, k, seed, params):
        phase1 = dataclasses.replace(runner.cfg.phase1, selector="gates", lr=float(params["phase1_lr"]),
                                     l0=float(params["l0"]))
        return self.ranked(runner, task, k, seed, phase1)
