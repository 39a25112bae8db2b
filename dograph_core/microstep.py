"""One micro-batch of training: forward, the statistics a mixer asked for, and the backward pass.

How the mixture acts (``Mixer.apply``, see ``mixers/base.py``):

* ``"sample"``: the loss is the mean token NLL of the batch; the mixture acted when sequences were drawn.
* ``"loss"``: the loss is ``mean(w * example_loss)`` with ``w = mixer.example_weights(stats)``.
* ``"grad"``: one gradient per domain present in the micro-batch (mean loss over that domain's
  sequences, ``torch.autograd.grad``) goes to the mixer as ``stats.domain_grads`` ``[k, P]`` (zeros for
  absent domains); the parameters' gradient is ``sum_k weights[k] * g_k``, averaged over
  micro-batches (and over ranks by the caller).

``P`` orders the parameters as ``model.parameters()`` does (the tied embedding once).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dograph_core.mixers.base import BatchStats, Mixer, MixerError


@dataclass
class MicroResult:
    loss: torch.Tensor       # mean token NLL of the micro-batch (detached, on device)
    objective: torch.Tensor  # what was back-propagated, before the 1/grad_accum scale (detached)


class LMLoss(torch.nn.Module):
    """The model's forward and the per-token NLL in one module, so ``torch.compile`` fuses the loss too.

    Returns ``(logits, token_loss [B, T], last hidden state or None)`` for a batch ``x`` of
    ``[B, T + 1]`` tokens (inputs ``x[:, :-1]``, targets ``x[:, 1:]``).
    """

    def __init__(self, model: torch.nn.Module, bf16: bool = False):
        super().__init__()
        self.model = model
        self.bf16 = bf16

    def forward(self, x: torch.Tensor, hidden: bool = False):
        inp, tgt = x[:, :-1], x[:, 1:]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(input_ids=inp, output_hidden_states=hidden, use_cache=False)
        logits = out.logits
        token_loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="none").view(tgt.shape)
        return logits, token_loss, (out.hidden_states[-1] if hidden else None)


def micro_step(
    fwd_model: LMLoss,
    model: torch.nn.Module,
    mixer: Mixer,
    x: torch.Tensor,
    domain_ids: torch.Tensor,
    step: int,
    lr: float,
    scale: float,
) -> MicroResult:
    """Forward and backward for one micro-batch; gradients accumulate in ``model``'s ``.grad``.

    ``fwd_model`` is an :class:`LMLoss` (around the DDP wrapper or the model, maybe compiled);
    ``model`` the raw module. ``scale`` is ``1 / grad_accum``.
    """
    needs = mixer.needs
    logits, token_loss, hidden = fwd_model(x, "hidden" in needs)
    example_loss = token_loss.mean(dim=1)
    stats = BatchStats(
        step=step,
        domain_ids=domain_ids,
        example_loss=example_loss.detach(),
        input_ids=x,
        lr=lr,
        token_loss=token_loss.detach() if "token_losses" in needs else None,
        hidden=hidden.detach() if hidden is not None else None,
        logits=logits.detach() if "hidden" in needs else None,
        model=model,
    )
    loss = example_loss.detach().mean()
    if mixer.apply == "grad":
        objective = _grad_step(model, mixer, example_loss, domain_ids, stats, scale)
    else:
        if mixer.apply == "loss":
            w = mixer.example_weights(stats)
            objective = example_loss.mean() if w is None else (_check_example_weights(w, x) * example_loss).mean()
        elif mixer.apply == "sample":
            objective = example_loss.mean()
        else:
            raise MixerError(f"mixer {mixer.name!r}: unknown apply mode {mixer.apply!r}; expected sample, loss or grad")
        (objective * scale).backward()
        mixer.observe(stats)
    return MicroResult(loss, objective.detach())


def _check_example_weights(w, x: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(w, device=x.device, dtype=torch.float32)
    if w.shape != (x.shape[0],):
        raise MixerError(f"example_weights returned shape {tuple(w.shape)}, expected ({x.shape[0]},)")
    return w.detach()


def _grad_step(model, mixer: Mixer, example_loss, domain_ids, stats: BatchStats, scale: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    k = len(mixer.ctx.domains)
    n_params = sum(p.numel() for p in params)
    grads = torch.zeros(k, n_params, device=example_loss.device, dtype=torch.float32)
    present = torch.zeros(k, dtype=torch.bool)
    doms = domain_ids.tolist()
    domain_set = sorted(set(doms))
    for j, d in enumerate(domain_set):
        mask = domain_ids == d
        g = torch.autograd.grad(example_loss[mask].mean(), params, retain_graph=j < len(domain_set) - 1)
        grads[d] = torch.cat([gi.reshape(-1).float() for gi in g])
        present[d] = True
    stats.domain_grads = grads
    stats.domain_present = present
    mixer.observe(stats)
    w = torch.as_tensor(np.asarray(mixer.weights, dtype=np.float32), device=grads.device)
    combined = (w[:, None] * grads).sum(0) * scale
    off = 0
    for p in params:
        n = p.numel()
        g = combined[off: off + n].view_as(p).to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        off += n
    # The objective as a number: the weighted per-domain losses that make up the step.
    with torch.no_grad():
        per = torch.stack([example_loss[domain_ids == d].mean() for d in domain_set])
        return (w[torch.tensor(domain_set, device=w.device)] * per).sum().detach()
