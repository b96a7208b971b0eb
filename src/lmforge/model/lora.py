"""LoRA and DoRA adapters, read and written in PEFT's format.

LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen linear layer W gets a trainable low-rank
update,  y = W x + s * B A x,  with A [r, in], B [out, r], B = 0 at the start (so training
starts from the base model) and s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski
2023, arXiv 2312.03732), which keeps the update's scale stable as r grows.

DoRA (Liu et al. 2024, arXiv 2402.09353): the weight is split into a magnitude m (one number
per output row) and a direction,  W' = m * (W + s B A) / ||W + s B A||_row.  m starts at the
row norms of W. As in the paper (section 4.3) and PEFT, the norm is treated as a constant in
the backward pass (detached), which saves memory and barely changes training.

Inside lmforge a targeted `nn.Linear` is replaced by a `LoraLinear` that keeps the base
layer's `weight` and `bias` under their own names, so the Hugging Face parameter names are
unchanged and only `lora_A`, `lora_B` (and `lora_magnitude_vector`) are added. On disk the
adapter is exactly what `peft.PeftModel.save_pretrained` writes, so PEFT loads ours and we
load PEFT's:

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, use_dora, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight      [r, in]
                                 base_model.model.<module>.lora_B.weight      [out, r]
                                 base_model.model.<module>.lora_magnitude_vector   [out] (DoRA)

The formulas follow peft/tuners/lora/layer.py and dora.py (PEFT 0.21), including where PEFT
detaches the norm and how it merges.

QLoRA: the base layer may be an `NF4Linear` (model/nf4.py, a 4-bit frozen weight). It is then kept
as the submodule `base_layer` and dequantised where the weight is needed (DoRA's row norms, a
merge); the adapters are the same, and so is the file, which applies to the unquantised base.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.checkpoint import to_disk_name
from lmforge.files import atomic_directory_write, read_json
from lmforge.model.nf4 import NF4Linear

ALL_LINEAR = "all-linear"
_PREFIX = "base_model.model."  # what PEFT puts before a module name in the adapter file


@dataclass
class LoraConfig:
    r: int = field(default=8, metadata={"help": "adapter rank", "min": 1})
    alpha: float = field(default=16.0, metadata={"help": "scale: alpha/r (alpha/sqrt(r) with use_rslora)",
                                                               "min": 0})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input", "min": 0, "max": 1})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "module-name suffixes to adapt, or all-linear (every linear layer in the blocks)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scale alpha/sqrt(r)"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: learn a magnitude per output row too"})
    init: Literal["kaiming", "gaussian"] = field(
        default="kaiming", metadata={"help": "A's init (B starts at 0): kaiming-uniform as PEFT, or N(0, 1/r)"})
    modules_to_save: list[str] = field(default_factory=list, metadata={
        "help": "modules trained whole and saved in the adapter beside it (PEFT's name), e.g. a reward model's score"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Also called by apply_lora: a config loader may set fields after construction."""
        if self.r <= 0:
            raise ValueError(f"r: must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """A frozen linear layer plus a low-rank (LoRA) or magnitude-and-direction (DoRA) update."""

    def __init__(self, base: nn.Linear | NF4Linear, settings: LoraConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, NF4Linear):
            self.base_layer = base  # QLoRA: the 4-bit frozen weight, dequantised on the fly
            base_dtype, device = base.dtype, base.codes.device
        else:
            self.weight = base.weight  # the same Parameter objects: names and storage unchanged
            base_dtype, device = base.weight.dtype, base.weight.device
        self.register_parameter("bias", base.bias)
        self.scaling = settings.scaling
        self.use_dora = settings.use_dora
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        # Half-precision base weights get fp32 adapters, as PEFT does by default (autocast_adapter_dtype):
        # the adapter is small, and its updates are too fine for bf16.
        dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        self.lora_A = nn.Parameter(torch.empty(settings.r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, settings.r, device=device, dtype=dtype))
        with torch.no_grad():
            if settings.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / settings.r)
            else:  # nn.Linear's own init, which is PEFT's default for A
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if self.use_dora:
                self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(dtype))

    @property
    def quantized(self) -> bool:
        return isinstance(getattr(self, "base_layer", None), NF4Linear)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen weight W in `dtype` (its own by default); an NF4 base is dequantised."""
        if self.quantized:
            return self.base_layer.dequantize(dtype or self.base_layer.dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in fp32, shaped like the base weight."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, as a constant (DoRA section 4.3)."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.base_weight(torch.float32) + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x) if self.quantized else F.linear(x, self.weight, self.bias)
        dropped = self.dropout(x).to(self.lora_A.dtype)
        lora = F.linear(F.linear(dropped, self.lora_A), self.lora_B)
        if not self.use_dora:
            return result + (lora * self.scaling).to(result.dtype)
        # PEFT's DoRA forward: the norm of W + s*(BA) is computed in the input's dtype from a detached
        # BA, so no gradient flows through it; then
        #   y = W x + b + (m/n - 1) * W x' + (m/n) * s * B A x'      (x' = dropout(x))
        # which is m/n * (W + s B A) x + b when dropout is off.
        with torch.no_grad():
            weight = self.base_weight(x.dtype)
            lora_weight = (self.lora_B @ self.lora_A).to(x.dtype)
            norm = torch.linalg.vector_norm(weight + self.scaling * lora_weight, dim=1)
        scale = (self.lora_magnitude_vector / norm).view(1, -1)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = result if self.bias is None else result - self.bias
        elif self.quantized:
            base = self.base_layer.matmul(dropped.to(x.dtype))
        else:
            base = F.linear(dropped.to(x.dtype), weight)
        return result + ((scale - 1) * base + scale * lora * self.scaling).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The plain weight that computes the same function (PEFT's merge), in the base dtype."""
        with torch.no_grad():
            weight = self.base_weight(torch.float32) + self.delta_weight()
            if self.use_dora:
                norm = torch.linalg.vector_norm(weight, dim=1)
                weight = (self.lora_magnitude_vector.float() / norm)[:, None] * weight
            return weight.to(self.base_layer.dtype if self.quantized else self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.lora_A.shape[0]}, "
                f"scaling={self.scaling:g}, dora={self.use_dora}" + (", base nf4" if self.quantized else ""))


# -- applying, merging ---------------------------------------------------------------------------

def target_module_names(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """The linear layers inside the blocks that `target_modules` selects, in model order.

    A name matches an entry if it equals it or ends with "." + entry (PEFT's rule); a plain string
    other than all-linear is a regular expression that must match the whole name (also PEFT's
    rule). `all-linear` is every nn.Linear in the blocks: PEFT's meaning, which leaves out the
    output head (lm_head is never inside a block here).
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    names = []
    for name, module in model.named_modules():
        if not (name.startswith("model.layers.") and isinstance(module, (nn.Linear, NF4Linear))):
            continue
        if name.endswith(".base_layer"):  # the NF4 weight inside a LoraLinear
            continue
        if targets == [ALL_LINEAR]:
            names.append(name)
        elif isinstance(target_modules, str):
            if re.fullmatch(target_modules, name):
                names.append(name)
        elif any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: nn.Module, settings: LoraConfig) -> nn.Module:
    """Wrap the targeted linear layers in place; freeze everything but the adapters."""
    settings.validate()
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters (merge_lora first to add another)")
    names = target_module_names(model, settings.target_modules)
    if not names:
        raise ValueError(f"target_modules: {settings.target_modules} matches no linear layer in the blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLinear(getattr(parent, child), settings))
    for name in settings.modules_to_save:  # trained whole, beside the adapters (PEFT's modules_to_save)
        for p in _module(model, name, "modules_to_save").parameters():
            p.requires_grad_(True)
    model.lora_settings = settings  # what save_adapter writes into adapter_config.json
    return model


def _module(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{what}: the model has no module '{name}'") from None


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back."""
    for name, m in lora_modules(model).items():
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(m.merged_weight(), requires_grad=not m.quantized and m.weight.requires_grad)
        linear.bias = m.bias
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, linear)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


# -- PEFT's file format ------------------------------------------------------------------------

def _disk_name(model: nn.Module, name: str) -> str:
    """The module's name as the base checkpoint spells it (Mixtral's experts differ)."""
    return to_disk_name(name + ".weight", model.config).removesuffix(".weight")


def adapter_config(settings: LoraConfig, model: nn.Module, base_model_path: str | None = None) -> dict:
    """adapter_config.json as PEFT writes it (the fields LoRA/DoRA use; PEFT fills the rest with defaults)."""
    # The adapted modules' full names, as PEFT writes all-linear: exact for every family and
    # independent of how the modules were chosen (PEFT matches a full name to itself).
    targets = sorted(_disk_name(model, n) for n in lora_modules(model))
    return {
        "peft_type": "LORA",
        # a reward model (num_labels 1) is transformers' sequence classifier
        "task_type": "SEQ_CLS" if getattr(model.config, "num_labels", None) else "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "use_rslora": settings.use_rslora,
        "use_dora": settings.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True if settings.init == "kaiming" else "gaussian",
        "inference_mode": True,
        "modules_to_save": list(settings.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under PEFT's names, and the whole weights of the modules saved beside them."""
    tensors = {}
    for module_name in model.lora_settings.modules_to_save:
        for name, tensor in _module(model, module_name, "modules_to_save").state_dict().items():
            tensors[f"{_PREFIX}{module_name}.{name}"] = tensor.detach().contiguous().cpu()
    for name, m in lora_modules(model).items():
        key = _PREFIX + _disk_name(model, name)
        tensors[f"{key}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
        if m.use_dora:  # PEFT writes the magnitude without a ".weight" suffix
            tensors[f"{key}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().contiguous().cpu()
    return tensors


def save_adapter(model: nn.Module, path: str | Path, base_model_path: str | None = None) -> Path:
    """Write the adapters as a PEFT adapter directory, atomically."""
    if not lora_modules(model):
        raise ValueError("the model has no LoRA adapters to save")
    config = adapter_config(model.lora_settings, model, None if base_model_path is None else str(base_model_path))
    tensors = adapter_state_dict(model)

    def write(tmp: Path):
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))

    return atomic_directory_write(path, write)


def _unsupported(config: dict, file: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type '{config['peft_type']}' is not LoRA")
    checks = {"bias": "none", "lora_bias": False, "rank_pattern": {},
              "alpha_pattern": {}, "fan_in_fan_out": False, "target_parameters": None,
              "trainable_token_indices": None, "layer_replication": None}
    for key, expected in checks.items():
        if config.get(key) is not None and config[key] != expected:
            raise ValueError(f"{file}: {key}={config[key]!r} is not supported (only {expected!r})")
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise ValueError(f"{file}: field 'modules_to_save': {saved!r:.40} should be a list of module names")


def read_adapter_settings(path: str | Path) -> LoraConfig:
    """LoraConfig from a PEFT adapter_config.json (targets as written there)."""
    file = Path(path) / "adapter_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter_config.json (is this a PEFT adapter directory?)")
    config = read_json(file)
    _unsupported(config, file)
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    checks = [("r", _is_number(config.get("r"), integer=True) and config["r"] >= 1, "a rank, an integer >= 1"),
              ("lora_alpha", _is_number(config.get("lora_alpha")) and config["lora_alpha"] > 0, "a positive number"),
              ("lora_dropout", _is_number(config.get("lora_dropout") or 0.0) and 0 <= (config.get("lora_dropout")
                                                                                      or 0.0) <= 1, "in [0, 1]"),
              ("target_modules", isinstance(targets, list) and all(isinstance(t, str) for t in targets),
               "module names (a string or a list of them)")]
    for key, ok, what in checks:
        if not ok:
            raise ValueError(f"{file}: field '{key}': {config.get(key)!r:.40} should be {what}")
    init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"
    return LoraConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout") or 0.0,
                      target_modules=list(targets), use_rslora=bool(config.get("use_rslora")),
                      use_dora=bool(config.get("use_dora")), init=init,
                      modules_to_save=list(config.get("modules_to_save") or []))


def _is_number(value, integer: bool = False) -> bool:
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a PEFT LoRA/DoRA adapter (ours or one peft saved) into `model`.

    A model without adapters gets them on exactly the modules the file holds; a model that
    already has adapters (resuming training) must have them on the same modules.
    """
    path = Path(path)
    settings = read_adapter_settings(path)
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing")
    tensors = {}
    try:
        saved = load_file(str(file))
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    whole = {}  # the weights of modules_to_save, by their name in the model
    for key, t in saved.items():
        if not key.startswith(_PREFIX):
            raise ValueError(f"{file}: unexpected tensor '{key}' (expected names starting {_PREFIX})")
        name = key[len(_PREFIX):]
        if any(name.startswith(m + ".") for m in settings.modules_to_save):
            whole[name] = t
            continue
        tensors[name.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")] = t
    ours_by_disk = {_disk_name(model, n): n for n, m in model.named_modules()
                    if isinstance(m, (nn.Linear, NF4Linear, LoraLinear)) and not n.endswith(".base_layer")}
    adapted = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    unknown = [k for k in adapted if k not in ours_by_disk]
    if unknown:
        raise ValueError(f"{file}: adapter for '{unknown[0]}', which this model does not have")
    names = [ours_by_disk[k] for k in adapted]
    if not lora_modules(model):
        # Adapt exactly the modules in the file: PEFT's regex or all-linear in config need no re-matching.
        apply_lora(model, replace(settings, target_modules=names))
        model.lora_settings = settings
    elif sorted(lora_modules(model)) != sorted(names):
        raise ValueError(f"{file}: adapts other modules than the model's adapters")
    elif any(m.use_dora != settings.use_dora for m in lora_modules(model).values()):
        raise ValueError(f"{file}: use_dora={settings.use_dora}, unlike the model's adapters")
    _load_whole(model, whole, settings.modules_to_save, file)
    expected = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if settings.use_dora else set())
    with torch.no_grad():
        for disk, name in zip(adapted, names):
            m = lora_modules(model)[name]
            for part in expected:
                key = f"{disk}.{part}" + ("" if part == "lora_magnitude_vector" else ".weight")
                if key not in tensors:
                    raise ValueError(f"{file}: missing tensor '{_PREFIX}{key}'")
                target = getattr(m, part)
                if tuple(tensors[key].shape) != tuple(target.shape):
                    raise ValueError(f"{file}: '{_PREFIX}{key}' has shape {tuple(tensors[key].shape)}, "
                                     f"expected {tuple(target.shape)}")
                target.copy_(tensors[key])
            m.scaling = settings.scaling
    return model


def _load_whole(model: nn.Module, tensors: dict[str, torch.Tensor], modules: list[str], file: Path) -> None:
    """Copy the saved weights of modules_to_save into the model, each checked to be there, of its shape."""
    state = {f"{m}.{k}": v for m in modules for k, v in _module(model, m, f"{file}: modules_to_save").state_dict(
        ).items()}
    missing = sorted(set(state) - set(tensors))
    if missing:
        raise ValueError(f"{file}: missing tensor '{_PREFIX}{missing[0]}' of modules_to_save")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{file}: '{_PREFIX}{name}' does not fit this model's "
                                 f"{tuple(state[name].shape) if name in state else 'modules'}")
            state[name].copy_(tensor)
