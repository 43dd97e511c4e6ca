"""Where the blocks and their MLP / attention layers are.

Recipes target named groups (`mlp`, `attention`, ...) instead of per-model regexes; FiPS and the
block-by-block engine need the (block, fc1, fc2) structure. Known families are described by the names
of their layers *relative to a block*; the blocks are found as the children of any
Sequential/ModuleList whose every child has those layers, so prefixes (`bert.`, `model.`,
`transformer.`) and Swin's stages need no special case. A family no table lists is found by shape:
a container of identical blocks, each holding a Linear pair d -> h, h -> d with h > d (plus a second
d -> h layer when the MLP is gated); the block's other Linears are its attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compresscli.core.errors import RecipeError
from compresscli.core.registry import did_you_mean

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
    hint: str = "target modules with 're:<regex>' instead"  # what to write when a named group is empty

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
                    raise RecipeError(f"{where}: group {pattern!r} is empty for this {self.family} model", self.hint)
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


def _is_linear(module: nn.Module) -> bool:
    """A Linear, GPT-2's Conv1D, or a compressed layer standing in for a Linear (FiPS, RPS, ...)."""
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return True
    dense = getattr(module, "dense_equivalent", None)
    return dense is not None and not isinstance(module, (nn.Conv2d, nn.Embedding)) \
        and "Embedding" not in type(module).__name__ and len(dense().get("weight", ())) == 2


def _linears(block: nn.Module) -> list[tuple[str, int, int]]:
    """(relative name, out, in) of a block's Linear layers (and GPT-2 Conv1D, and compressed ones)."""
    found = []
    for name, module in block.named_modules():
        if name and _is_linear(module):
            out, inp = _weight_shape(module)
            found.append((name, out, inp))
    return [f for f in found if not any(f[0].startswith(g[0] + ".") for g in found)]  # outermost only


def mlp_by_shape(block: nn.Module) -> tuple[dict[str, tuple[str, str]], list[str]] | None:
    """(MLP layout, other Linear names) of one block by the structural rule, or None when no Linear pair
    d -> h, h -> d with h > d exists. Among several pairs, the widest h is the MLP."""
    linears = _linears(block)
    pairs = [(up, down) for up in linears for down in linears
             if up[2] == down[1] and up[1] == down[2] and up[1] > up[2]]
    if not pairs:
        return None
    up, down = max(pairs, key=lambda pair: (pair[0][1], -linears.index(pair[0])))
    gate = [l for l in linears if l is not up and l[1:] == up[1:]]
    if gate:  # gated: the first of the two d -> h layers in definition order is the gate
        first, second = sorted([gate[0], up], key=linears.index)
        layout = {"gate": (first[0], "in"), "up": (second[0], "in"), "down": (down[0], "out")}
    else:
        layout = {"fc1": (up[0], "in"), "fc2": (down[0], "out")}
    mlp_names = {rel for rel, _ in layout.values()}
    return layout, [name for name, _, _ in linears if name not in mlp_names]


def _structural_blocks(model: nn.Module) -> list[tuple[str, nn.Module, dict, list[str]]]:
    """Containers of two or more blocks of one class whose every block yields the same MLP layout."""
    found = []
    for cname, container in _containers(model):
        children = list(container)
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        shapes = [mlp_by_shape(c) for c in children]
        if shapes[0] is not None and all(s == shapes[0] for s in shapes):
            found.append((cname, container, *shapes[0]))
    return found


def _no_rule_hint(model: nn.Module) -> str:
    """What to write when no block structure is found: a block's Linear layers and a regex for one."""
    candidates = [(cname, c) for cname, c in _containers(model) if len(c) > 1 and len({type(x) for x in c}) == 1]
    for cname, container in sorted(candidates, key=lambda item: -len(item[1])):
        linears = _linears(container[0])
        if linears:
            shown = ", ".join(f"{rel} ({inp}->{out})" for rel, out, inp in linears[:6])
            regex = f"re:{_escape(cname)}\\.\\d+\\.{_escape(linears[0][0])}"
            return f"no block holds an MLP pair (d -> h, h -> d, h > d); a block's Linear layers are {shown}; " \
                   f"target them with e.g. '{regex}'"
    return "target modules with 're:<regex>' instead"


def _escape(name: str) -> str:
    return name.replace(".", "\\.")


def detect(model: nn.Module) -> Architecture:
    """Find blocks and named groups. Unknown families still get `linear`, `embeddings`, `head`."""
    family, blocks = "generic", []
    found_layouts = []
    for layout_name, layout in MLP_LAYOUTS.items():
        found = [(cname, container, layout, list(ATTENTION_LAYERS[layout_name])) for cname, container in _containers(model)
                 if all(all(_get(child, rel) is not None for rel, _ in layout.values()) for child in container)]
        if found:
            family, found_layouts = layout_name, found
            break
    if not found_layouts:
        found_layouts = _structural_blocks(model)
        family = "structural" if found_layouts else "generic"
    for stage, (cname, container, layout, attention_rel) in enumerate(found_layouts):
        for i, child in enumerate(container):
            bname = f"{cname}.{i}" if cname else str(i)
            mlp = [MlpLayer(role, f"{bname}.{rel}", orient) for role, (rel, orient) in layout.items()]
            hidden, width = _weight_shape(_get(child, layout[next(iter(layout))][0]))
            attention = [f"{bname}.{a}" for a in attention_rel if _get(child, a) is not None]
            blocks.append(Block(bname, len(blocks), stage, mlp, attention, width, hidden))

    modules = dict(model.named_modules())
    head = [n for n in HEAD_NAMES if n in modules and isinstance(modules[n], nn.Linear)][:1]
    linear = [n for n, m in modules.items() if n and _is_linear(m) and n not in head]
    groups = {
        "mlp": [layer.name for b in blocks for layer in b.mlp],
        "attention": [a for b in blocks for a in b.attention],
        "blocks": [n for b in blocks for n in linear if n.startswith(b.name + ".")],
        "linear": linear,
        "conv": [n for n, m in modules.items() if isinstance(m, nn.Conv2d)],
        "embeddings": [n for n, m in modules.items() if isinstance(m, nn.Embedding)],
        "head": head,
    }
    hint = "target modules with 're:<regex>' instead" if blocks else _no_rule_hint(model)
    return Architecture(family, blocks, groups, hint)


def block_names_of(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Each module name -> the name of the block holding it (itself when it is outside every block)."""
    blocks = [b.name for b in detect(model).blocks]
    return {n: next((b for b in blocks if n.startswith(b + ".")), n) for n in names}
