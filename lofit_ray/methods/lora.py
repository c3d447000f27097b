"""LoRA (peft) on the attention projections, trained by the same loop as LoFiT: one cell per seed, no K."""
import contextlib
import dataclasses

from .base import Method


class Lora(Method):
    name = "lora"

    def setting_part(self, cfg, task: str) -> dict:
        return {"lora": {k: v for k, v in dataclasses.asdict(cfg.lora).items() if k not in ("lr", "rank")}}

    @contextlib.contextmanager
    def trained(self, runner, task, k, seed, params, on_epoch=None):
        from ..baselines import lora

        _, splits = runner.splits(task)
        settings = dataclasses.replace(runner.cfg.lora, lr=float(params["lr"]), rank=int(params["rank"]),
                                       epochs=int(params.get("epochs", runner.cfg.lora.epochs)))
        peft_model, info = lora.train_lora(runner.loaded, splits.train, runner.training(seed), settings,
                                           on_epoch=on_epoch)
        try:
            yield {"trainable_params": info["trainable_parameters"], "total_params": info["total_parameters"]}
        finally:
            peft_model.unload()  # take the LoRA layers out of the runner's model again
