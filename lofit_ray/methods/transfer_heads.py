"""The paper's Figure 2 ablation: phase 2 on the heads LoFiT's phase 1 chose for a different task."""
import dataclasses

from .base import HeadMethod
from .lofit import Lofit
from .setting import method_setting


class TransferHeads(HeadMethod):
    name = "transfer_heads"

    def setting_part(self, cfg, task: str) -> dict:
        source = cfg.transfer_source(task)
        return {**super().setting_part(cfg, task),
                "source": {"task": source, "lofit": method_setting(cfg, source, Lofit()) if "lofit" in cfg.methods
                           else dataclasses.asdict(cfg.phase1)}}

    def head_set(self, runner, task, k, seed, params):
        from ..heads import HeadSet

        source = runner.cfg.transfer_source(task)
        if "lofit" in runner.cfg.methods:  # the source task's LoFiT ranking at its chosen phase 1
            phase1 = Lofit.phase1(runner.cfg, runner.search(source, "lofit", k)["chosen"])
        else:
            phase1 = dataclasses.replace(runner.cfg.phase1, selector="l1")
        head_set, info = self.ranked(runner, source, k, seed, phase1)
        head_set = HeadSet(**{**dataclasses.asdict(head_set), "method": "transfer",
                              "hparams": {**head_set.hparams, "transferred_from": source}})
        return head_set, {**info, "heads_from": source}
