"""The config.json an artifact stores: a wrapper with model_type "hypercompress" whose `base_config`
is the source model's own config (why a wrapper: hf_integration.py). transformers' config classes
only; the model door and the Auto-class registration are in hf_integration.py."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig

MODEL_TYPE = "hypercompress"


class HypercompressConfig(PreTrainedConfig):
    """The wrapper config: `base_config` (dict) is the source model's config, with its model_type."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: dict[str, Any] | None = None, **kwargs: Any):
        self.base_config = base_config or {}
        super().__init__(**kwargs)

    def base(self) -> PreTrainedConfig:
        """The source model's config object (a UserError if the wrapper holds none)."""
        return base_config_of(self.base_config)


def base_config_of(entry: Any) -> PreTrainedConfig:
    from ..errors import UserError

    if not isinstance(entry, dict) or not isinstance(entry.get("model_type"), str):
        raise UserError("the artifact's config.json has no valid base_config; re-create the artifact")
    fields = {k: v for k, v in entry.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(entry["model_type"], **fields)
    except Exception as exc:  # a hostile config: transformers' own validators raise many kinds
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the artifact's base_config does not build a config ({first}); "
                        "re-create the artifact") from None


def wrapper_config(config: PreTrainedConfig) -> HypercompressConfig:
    """The config.json an artifact stores for a model whose own config is `config`."""
    base = config.to_dict()
    base.pop("quantization_config", None)
    base.pop("_name_or_path", None)  # a machine path, not part of the model
    return HypercompressConfig(
        base_config=base, architectures=["HypercompressForCausalLM"],
        quantization_config={"quant_method": MODEL_TYPE, "loader": "pip install hypercompress; "
                             "import hypercompress (registers it with transformers)"})
