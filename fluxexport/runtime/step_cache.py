"""What every step cache is: a callable that decides, step by step, whether the transformer runs, and counts
the steps it computed; and what the caches on the transformer's parts share."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

Output = dict[str, torch.Tensor]
PARTS = ("transformer_head", "transformer_tail", "transformer_out")  # what first-block, magcache, teacache run


Components = Callable[[str], Callable[[Output], Output]]  # a component by name (a Backend's `component`)


class StepCache:
    """Decides, step by step, whether the transformer runs; counts the steps it computed. Called with the step's
    transformer feeds and the backend's components by name. `components`: the transformer components it runs
    (loaded before a run's clock starts)."""

    name = "none"
    components: tuple[str, ...] = ("transformer",)

    def __init__(self) -> None:
        self.steps = 0  # transformer calls asked for
        self.computed = 0  # of them, full evaluations
        self.decisions: list[bool] = []  # per call: whether it computed (the cache's skip decisions)

    def __call__(self, feeds: Output, component: Components) -> Output:
        raise NotImplementedError

    def check_components(self, component: Components) -> None:
        """Refuse, in one line before the first step, components this cache cannot run (nothing by default)."""

    def branch(self) -> StepCache:
        """A fresh state with this one's settings, for a second transformer run per step (true CFG's unconditional
        run): diffusers' hooks keep one state per cache context ("cond", "uncond"), so each run caches its own."""
        if self.steps:
            raise RuntimeError(f"{self.name}: branch() copies a state before its first step")
        return copy.deepcopy(self)

    def __str__(self) -> str:
        return self.name


class NoCache(StepCache):
    def __call__(self, feeds: Output, component: Components) -> Output:
        self.steps += 1
        self.computed += 1
        self.decisions.append(True)
        return component("transformer")(feeds)


# The head's outputs the tail reads: both streams, the time embedding and, on FLUX.2, the double blocks' modulation
# vectors (computed once, in the head; FLUX.1's heads have none)
HEAD_TO_TAIL = ("image_hidden", "text_hidden", "temb", "image_modulation", "text_modulation")


def tail_feeds(head: Output, feeds: Output) -> Output:
    """What `transformer_tail` takes: the head's outputs it reads (`HEAD_TO_TAIL`, those the head gives), the step's
    RoPE ids."""
    passed = {key: head[key] for key in HEAD_TO_TAIL if key in head}
    return passed | {key: feeds[key] for key in ("img_ids", "txt_ids")}
