"""The cost model a method declares: what its working memory depends on (MethodConfig.working_bytes and
resident_bytes read a Workload; the engine's planning builds one per stage from the model's shapes)."""
from __future__ import annotations

from dataclasses import dataclass

# Measured on CPU (MiniLM, tiny Llama; float32): what autograd keeps per token, per unit of width, per
# block for the backward pass, and what one block's no-grad forward holds at once.
TRAINING_BYTES = 48
INFERENCE_BYTES = 32
LOGIT_COPIES = 4  # an LM head's logits, their float copy, softmaxes and gradient


@dataclass(frozen=True)
class Workload:
    """What a stage's working memory depends on; MethodConfig.working_bytes reads it."""

    weights: int  # targeted weights (elements)
    largest_layer: int  # elements of the largest targeted weight
    fan_in: int  # the widest input of a targeted layer (a Hessian is fan_in x fan_in)
    value_bytes: int  # bytes per value in the run's dtype
    model_bytes: int  # the model (whole-model runs) or the unit (block by block) the stage works on
    blocks: int  # transformer blocks the stage runs through
    width: int  # hidden size
    heads: int
    vocab: int  # width of an LM head the training loss goes through (0 when none)
    batch_tokens: int  # tokens per training or calibration step
    seq_len: int
    calibration_tokens: int  # every calibration token
    captures: bool  # whole-model runs capture block inputs/outputs for reconstruction in the stage's memory
    shards: int = 1  # ranks the training state is split across (sharded recovery)

    def activations(self, tokens: int | None = None, blocks: int | None = None) -> int:
        """What autograd keeps for a forward and backward over `tokens` through `blocks` blocks."""
        tokens = self.batch_tokens if tokens is None else tokens
        blocks = self.blocks if blocks is None else blocks
        per_block = tokens * (self.width * TRAINING_BYTES + self.heads * self.seq_len * 8)  # float32: see below
        return blocks * per_block + LOGIT_COPIES * tokens * self.vocab * 4

    def optimiser(self, param_bytes: int) -> int:
        """Gradients and AdamW's two moments in float32 (a rank's share, sharded), and the float32 master copy
        low-precision weights train as (training.float32_master: 4 - value_bytes more per value)."""
        values = param_bytes // self.value_bytes
        return 3 * 4 * values // self.shards + (4 - self.value_bytes) * values


def inference_bytes(width: int, heads: int, seq_len: int, batch_tokens: int, vocab: int) -> int:
    """What a no-grad forward of a batch holds at once: one block's intermediates, and an LM head's logits."""
    return batch_tokens * (width * INFERENCE_BYTES + heads * seq_len * 8) + 2 * batch_tokens * vocab * 4
