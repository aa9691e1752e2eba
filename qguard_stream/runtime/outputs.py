"""What a paged step returns from the final hidden states: guard scores for every row (StreamGuard,
the engine), next-token logits for each session's last row (Gen decoding), or the hidden states
themselves (parity checks).

Each output computes on the device inside a step (so a CUDA graph captures it, over a fixed
[bucket, width] result), on the host after the C step, and splits a step's result per chunk.
Owns no weights beyond views of the model's and no session state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from qguard_stream.kernels.cpu_step import load as cpu_step_library
from qguard_stream.models.guard import GuardHead
from qguard_stream.runtime.cpu_step import CpuHead
from qguard_stream.runtime.layer import FastHead

if TYPE_CHECKING:
    from qguard_stream.runtime.paged import Chunk, StepMeta

class Probs(tuple):  # type: ignore[type-arg]  # (risk_probs, category_probs)
    """One chunk's (risk_probs [k, R], category_probs [k, C]), unpacked as a pair. `finite`: the
    whole step's probabilities were found free of NaN/Inf with one reduction, so the chunk needs
    no check of its own (verdicts.build_verdicts)."""

    finite: bool

    def __new__(cls, risk: torch.Tensor, category: torch.Tensor, finite: bool = False) -> Probs:
        probs = super().__new__(cls, (risk, category))
        probs.finite = finite
        return probs


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every value is finite, read through sums (NaN and +-Inf survive a sum of
    probabilities): one reduction per tensor for a whole step."""
    return all(math.isfinite(float(t.sum())) for t in tensors)


class StepOutput(Protocol):
    width: int  # columns of the step's result

    def on_device(self, hidden: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        """[rows or sessions, width] fp32 from the step's hidden [rows, hidden]."""
        ...

    def on_host(self, hidden: torch.Tensor, chunks: Sequence[Chunk]) -> list[Any]:
        """Each chunk's result from host hidden states."""
        ...

    def split(self, out: torch.Tensor, chunks: Sequence[Chunk]) -> list[Any]:
        """Each chunk's result from on_device's output (copied to the host)."""
        ...


class GuardScores:
    """(risk_probs [k, R], category_probs [k, C]) fp32 for every new token of a chunk, from its
    role's head: "user" reads the query head, "assistant" the response head."""

    def __init__(self, heads: dict[str, GuardHead]) -> None:
        self.heads = heads
        # The heads as plain GEMMs (FastHead): at decode sizes cuBLAS spreads the projection over
        # the GPU, where the fused head kernel streams it through one multiprocessor.
        self.scorers = {role: FastHead(head) for role, head in heads.items()}
        self.num_risk = heads["assistant"].risk.weight.shape[0]
        self.categories = {role: head.category.weight.shape[0] for role, head in heads.items()}
        self.width = self.num_risk + max(self.categories.values())
        # After the C step: the same heads in the library, for fp32 or bf16 hidden states (made
        # at the first such step; empty without the library).
        self.host_scorers: dict[str, CpuHead] | None = None

    def on_device(self, hidden: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        """Both heads over every row, each row keeping its role's (category columns past a
        head's count are 0), so one captured graph serves any mix of roles."""
        scores = []
        for role in ("user", "assistant"):
            risk, category = self.scorers[role](hidden)
            missing = self.width - self.num_risk - category.shape[1]
            scores.append(torch.cat((risk, F.pad(category, (0, missing))), dim=1))
        return torch.where((meta.user != 0)[:, None], scores[0], scores[1])

    def on_host(self, hidden: torch.Tensor, chunks: Sequence[Chunk]) -> list[Probs]:
        """A step of one role runs that role's head only; fp32 or bf16 rows through the C
        library's head when it is built here (its probabilities fp32 either way)."""
        sizes = [chunk.token_ids.shape[0] for chunk in chunks]
        scorers: Mapping[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = \
            self.scorers
        if hidden.device.type == "cpu" and hidden.dtype in CpuHead.DTYPES:
            if self.host_scorers is None:
                library = cpu_step_library()
                usable = library is not None and all(map(CpuHead.takes, self.scorers.values()))
                self.host_scorers = {role: CpuHead(scorer, library) for role, scorer
                                     in self.scorers.items()} if usable else {}
            scorers = self.host_scorers or self.scorers
        parts, finite = {}, True
        for role in {chunk.role for chunk in chunks}:  # views, one head call per role
            risk, category = scorers[role](hidden)
            finite = finite and all_finite(risk, category)
            parts[role] = (risk.split(sizes), category.split(sizes))
        return [Probs(parts[chunk.role][0][i], parts[chunk.role][1][i], finite)
                for i, chunk in enumerate(chunks)]

    def split(self, out: torch.Tensor, chunks: Sequence[Chunk]) -> list[Probs]:
        sizes = [chunk.token_ids.shape[0] for chunk in chunks]
        rows, r = out[:sum(sizes)], self.num_risk
        finite = all_finite(rows)  # the padding columns past a head's categories hold 0
        risk = rows[:, :r].split(sizes)
        categories = {role: rows[:, r:r + self.categories[role]].split(sizes)
                      for role in {chunk.role for chunk in chunks}}
        return [Probs(risk[i], categories[chunk.role][i], finite)
                for i, chunk in enumerate(chunks)]


class NextTokenLogits:
    """The vocabulary logits (fp32 [vocab]) after each chunk's last token: the LM head applied to
    each session's last row only."""

    def __init__(self, lm_head: torch.Tensor) -> None:
        self.weight_t = lm_head.t()  # [hidden, vocab] view of [vocab, hidden]
        self.width = lm_head.shape[0]

    def on_device(self, hidden: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        # A padding session (q_len 0) reads row 0; its logits are never used.
        last = (meta.q_start + meta.q_len - 1).clamp(min=0).to(hidden.device, torch.int64)
        return torch.mm(hidden.index_select(0, last), self.weight_t).float()

    def on_host(self, hidden: torch.Tensor, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
        ends, row = [], 0
        for chunk in chunks:
            row += chunk.token_ids.shape[0]
            ends.append(row - 1)
        logits = torch.mm(hidden[ends], self.weight_t).float()
        return list(logits.unbind(0))

    def split(self, out: torch.Tensor, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
        return list(out[:len(chunks)].unbind(0))


class FinalHidden:
    """The final (normed) hidden states of every row, fp32 [k, hidden] per chunk: what the heads
    read; for parity checks against other implementations of the backbone."""

    def __init__(self, hidden_size: int) -> None:
        self.width = hidden_size

    def on_device(self, hidden: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        return hidden.float()

    def on_host(self, hidden: torch.Tensor, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
        return self.split(hidden.float(), chunks)

    def split(self, out: torch.Tensor, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
        return list(out[:sum(chunk.token_ids.shape[0] for chunk in chunks)].split(
            [chunk.token_ids.shape[0] for chunk in chunks]))
