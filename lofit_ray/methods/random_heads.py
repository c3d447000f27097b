"""The control: phase 2 on K heads drawn at random (seeded), trained exactly like LoFiT's."""
import dataclasses

from .base import HeadMethod


class RandomHeads(HeadMethod):
    name = "random_heads"
    selector = "random"

    def head_set(self, runner, task, k, seed, params):
        from ..heads import HeadSet, random_ranking

        loaded = runner.loaded
        return HeadSet(model=loaded.spec, fingerprint=loaded.fingerprint, layout=dataclasses.asdict(loaded.layout),
                       ranking=random_ranking(loaded.layout, seed), k=k, method="random", task=task, seed=seed), {}
