"""ReFT (LoReFT) on one layer's residual stream, trained by the same loop as LoFiT: one cell per seed, no K."""
import contextlib
import dataclasses

from .base import Method


class Reft(Method):
    name = "reft"

    def setting_part(self, cfg, task: str) -> dict:
        return {"reft": {k: v for k, v in dataclasses.asdict(cfg.reft).items() if k not in ("lr", "depth")}}

    @contextlib.contextmanager
    def trained(self, runner, task, k, seed, params, on_epoch=None):
        from ..baselines import reft

        _, splits = runner.splits(task)
        settings = dataclasses.replace(runner.cfg.reft, lr=float(params["lr"]), depth=float(params["depth"]),
                                       epochs=int(params.get("epochs", runner.cfg.reft.epochs)))
        edit, info = reft.train_reft(runner.loaded, splits.train, runner.training(seed), settings, on_epoch=on_epoch)
        try:
            yield {"trainable_params": info["trainable_parameters"], "layer": info["layer"]}
        finally:
            edit.detach()
