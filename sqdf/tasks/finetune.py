"""How a task's backbone network becomes a policy and a reference.

- ``lora`` (the default): a peft LoRA on the network; the policy is the adapter, the reference
  the same network with the adapter switched off (one copy of the weights).
- ``full``: every weight of the network trains; the reference is a frozen copy of the
  pretrained network, kept in its loaded dtype (twice the weights in memory, plus the optimizer
  state of all of them: the setting FSDP shards across processes).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sqdf.errors import ConfigError
from sqdf.tasks.lora import LoraPolicy, adapters_disabled, add_lora

FINETUNE = ("lora", "full")


def check_network_options(finetune: str, compile: bool, channels_last: bool, task: str) -> None:
    if finetune not in FINETUNE:
        raise ConfigError(f"{task} finetune must be one of {', '.join(FINETUNE)}, got {finetune!r}")
    for name, value in (("compile", compile), ("channels_last", channels_last)):
        if not isinstance(value, bool):
            raise ConfigError(f"{task} {name} must be true or false, got {value!r}")


class PolicyAndReference:
    """The networks the task runs: ``network(policy=True)`` for the policy, ``False`` for
    the reference. ``policy`` is the module holding every trainable weight (its state dict is
    what a run saves); ``reference_net`` is where frozen extras (an LCM-LoRA) belong."""

    def __init__(
        self,
        net: nn.Module,
        finetune: str,
        rank: int,
        alpha: float,
        targets: list[str],
        lora_init: str = "default",
    ):
        self.finetune = finetune
        self.net = net
        if finetune == "lora":
            add_lora(net, rank, alpha, targets, lora_init)
            self.reference_net = net
            self.policy: nn.Module = LoraPolicy(net)
        else:
            self.reference_net = copy.deepcopy(net).requires_grad_(False)
            net.requires_grad_(True)
            self.policy = net  # the network itself, so FSDP can shard what the task calls

    def speed_up(self, *, compile: bool, channels_last: bool) -> None:
        """Options measured in docs/performance.md: channels-last weights (convolutions in
        NHWC, which GPU tensor cores and oneDNN prefer) and torch.compile of each network
        (in place: the task, the optimizer and FSDP keep the same module objects)."""
        for net in self.networks:
            if channels_last:
                net.to(memory_format=torch.channels_last)
            if compile:
                net.compile()

    @property
    def shardable(self) -> bool:
        return self.finetune == "full"

    @property
    def networks(self) -> list[nn.Module]:
        """Each distinct network once (one under LoRA, two under full fine-tuning)."""
        return [self.net] if self.reference_net is self.net else [self.net, self.reference_net]

    @contextmanager
    def network(self, *, policy: bool) -> Iterator[nn.Module]:
        if policy:
            yield self.net
        elif self.finetune == "lora":
            with adapters_disabled(self.net):
                yield self.net
        else:
            yield self.reference_net
