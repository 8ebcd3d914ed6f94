"""
LoRA (Hu et al., 2021, "Low-Rank Adaptation of Large Language Models") through Hugging Face `peft`: each
targeted Linear W gets a trainable low-rank update (alpha / r) * B @ A beside the frozen W, so only
r * (d_in + d_out) numbers per matrix are trained and kept in the optimizer. peft wraps the modules in
place, so the model code stays unaware (as with gradient checkpointing, applied from outside).

The adapter is saved in peft's own format (adapter_config.json + adapter_model.safetensors) and can be
loaded back onto the same base with load_adapter, or merged into the base weights (merged_state_dict),
which is what a fine-tuning run's ckpt.pt holds so sampling and export need no peft.
"""
import os

import torch

from nanoforge.errors import UserError
from nanoforge.files import atomic_folder

DEFAULT_TARGETS = "c_attn,c_proj,c_fc"  # attention's qkv and output projections, the MLP's two Linears


def apply_lora(model, rank, alpha, dropout, targets=DEFAULT_TARGETS):
    """The model wrapped by peft with fresh adapters on the Linears whose names end in one of `targets`
    (comma-separated); every other parameter is frozen. B starts at zero, so the output is unchanged."""
    import peft
    names = [t.strip() for t in targets.split(",") if t.strip()]
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in names if t not in linear]
    if unknown or not names:
        raise UserError(f"lora_targets={targets!r}: {unknown or 'nothing'} is not a Linear of this model; "
                        f"choose from {', '.join(sorted(linear))}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    return peft.get_peft_model(model, config)


def merged_state_dict(peft_model):
    """The base model's state_dict with every adapter's update added into its weight, under the plain
    GPT-2 names (no peft prefixes): a checkpoint any nanoforge script loads. The live model is untouched."""
    from peft.tuners.lora import LoraLayer
    base = peft_model.get_base_model()
    out = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in base.state_dict().items() if "lora_" not in k}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                out[f"{name}.weight"] += module.get_delta_weight(adapter).detach()  # (out, in) like nn.Linear
    return out


def save_adapter(peft_model, folder):
    """Writes the adapter in peft's format; the new folder replaces the old only once it is complete."""
    with atomic_folder(folder) as tmp:
        peft_model.save_pretrained(tmp)


def load_adapter(model, folder):
    """The base model with a saved adapter on it (inference mode: nothing trainable)."""
    import peft
    if not os.path.exists(os.path.join(folder, "adapter_config.json")):
        raise UserError(f"no LoRA adapter in {folder} (needs adapter_config.json); fine-tune with lora_rank > 0")
    return peft.PeftModel.from_pretrained(model, folder)
