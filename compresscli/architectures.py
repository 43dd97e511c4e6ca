"""Where the blocks and their MLP / attention layers are, for the model families we know.

Recipes target named groups (`mlp`, `attention`, ...) instead of per-model regexes; FiPS needs the
(block, fc1, fc2) structure. Families are described by the names of their layers *relative to a
block*; the blocks are found as the children of any Sequential/ModuleList whose every child has
those layers, so prefixes (`bert.`, `model.`, `transformer.`) and Swin's stages need no special case.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import RecipeError
from .registry import did_you_mean

# role -> (relative name, orientation). "in" layers map width d -> hidden h (weight h x d);
# "out" layers map h -> d (weight d x h). FiPS views every matrix as d x h from these.
MLP_LAYOUTS: dict[str, dict[str, tuple[str, str]]] = {
    "timm-mlp": {"fc1": ("mlp.fc1", "in"), "fc2": ("mlp.fc2", "out")},
    "timm-swiglu": {"gate": ("mlp.fc1_g", "in"), "up": ("mlp.fc1_x", "in"), "down": ("mlp.fc2", "out")},
    "bert": {"fc1": ("intermediate.dense", "in"), "fc2": ("output.dense", "out")},
    "gpt2": {"fc1": ("mlp.c_fc", "in"), "fc2": ("mlp.c_proj", "out")},
    "llama": {"gate": ("mlp.gate_proj", "in"), "up": ("mlp.up_proj", "in"), "down": ("mlp.down_proj", "out")},
}
ATTENTION_LAYERS: dict[str, tuple[str, ...]] = {
    "timm-mlp": ("attn.qkv", "attn.proj"),
    "timm-swiglu": ("attn.qkv", "attn.proj"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
}
HEAD_NAMES = ("head", "head.fc", "classifier", "lm_head", "fc", "score")
PRUNABLE = (nn.Linear, nn.Conv2d)


@dataclass
class MlpLayer:
    role: str  # fc1 / fc2 / gate / up / down
    name: str  # fully qualified module name
    orientation: str  # "in" (d -> h) or "out" (h -> d)


@dataclass
class Block:
    name: str
    index: int  # position among all blocks of the model
    stage: int  # blocks of one stage share a container and a width; groups never cross stages
    mlp: list[MlpLayer]
    attention: list[str]
    width: int  # d
    hidden: int  # h


@dataclass
class Architecture:
    family: str
    blocks: list[Block]
    groups: dict[str, list[str]] = field(default_factory=dict)

    def resolve(self, patterns: list[str], model: nn.Module, where: str) -> list[str]:
        """Module names matched by named groups or `re:<regex>` patterns (fullmatch), in model order."""
        import re

        names = [n for n, _ in model.named_modules() if n]
        chosen: set[str] = set()
        for pattern in patterns:
            if pattern.startswith("re:"):
                try:
                    regex = re.compile(pattern[3:])
                except re.error as err:
                    raise RecipeError(f"{where}: invalid regex {pattern!r} ({err})", "fix the regular expression")
                hits = [n for n in names if regex.fullmatch(n)]
                if not hits:
                    raise RecipeError(f"{where}: target {pattern!r} matches no module",
                                      f"module names look like {', '.join(names[1:4])} (the regex must match the whole name)")
            elif pattern in self.groups:
                hits = self.groups[pattern]
                if not hits:
                    raise RecipeError(f"{where}: group {pattern!r} is empty for this {self.family} model",
                                      "target modules with 're:<regex>' instead")
            else:
                raise RecipeError(f"{where}: unknown target {pattern!r}",
                                  f"{did_you_mean(pattern, list(self.groups))} (or use 're:<regex>')")
            chosen.update(hits)
        return [n for n in names if n in chosen]


def _containers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
            yield name, module


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None) if module is not None else None
        if module is None or not isinstance(module, nn.Module):
            return None
    return module


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) for Linear; transformers' GPT-2 Conv1D stores (in, out); compressed layers say their
    dense shape (a FiPS layer has no weight tensor at all)."""
    dense = getattr(module, "dense_equivalent", None)
    w = tuple(dense()["weight"] if dense else module.weight.shape)
    return (w[1], w[0]) if type(module).__name__ == "Conv1D" else (w[0], w[1])


def detect(model: nn.Module) -> Architecture:
    """Find blocks and named groups. Unknown families still get `linear`, `embeddings`, `head`."""
    family, blocks = "generic", []
    for layout_name, layout in MLP_LAYOUTS.items():
        found = []
        for cname, container in _containers(model):
            if all(all(_get(child, rel) is not None for rel, _ in layout.values()) for child in container):
                found.append((cname, container))
        if found:
            family = layout_name
            for stage, (cname, container) in enumerate(found):
                for i, child in enumerate(container):
                    bname = f"{cname}.{i}" if cname else str(i)
                    mlp = [MlpLayer(role, f"{bname}.{rel}", orient) for role, (rel, orient) in layout.items()]
                    first = _get(child, layout[next(iter(layout))][0])
                    hidden, width = _weight_shape(first)
                    attention = [f"{bname}.{a}" for a in ATTENTION_LAYERS[layout_name] if _get(child, a) is not None]
                    blocks.append(Block(bname, len(blocks), stage, mlp, attention, width, hidden))
            break

    modules = dict(model.named_modules())
    head = [n for n in HEAD_NAMES if n in modules and isinstance(modules[n], nn.Linear)][:1]
    linear = [n for n, m in modules.items()
              if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and n not in head]
    groups = {
        "mlp": [layer.name for b in blocks for layer in b.mlp],
        "attention": [a for b in blocks for a in b.attention],
        "blocks": [n for b in blocks for n in linear if n.startswith(b.name + ".")],
        "linear": linear,
        "conv": [n for n, m in modules.items() if isinstance(m, nn.Conv2d)],
        "embeddings": [n for n, m in modules.items() if isinstance(m, nn.Embedding)],
        "head": head,
    }
    return Architecture(family, blocks, groups)
