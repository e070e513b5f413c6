"""The ``README.md`` model card of a saved ReSTE model (Hub metadata, usage, results, citation).

Kept apart from :mod:`reste_timm.hub.save` so that the saving and checking code stays short; the card is
rendered from the ``config.json`` content alone, so it always describes the files beside it.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import yaml
from huggingface_hub import EvalResult, ModelCardData

from ..models import hub_id

__all__ = ["render_model_card"]

# Hub dataset ids and pretty names for the pretrained tags of the registered models.
_DATASETS = {"cifar10": ("cifar10", "CIFAR-10"), "in1k": ("imagenet-1k", "ImageNet-1k")}
# Metric keys the training scripts report -> (model-index metric type, pretty name).
_METRICS = {"top1": ("accuracy", "Top-1 accuracy"), "acc1": ("accuracy", "Top-1 accuracy"),
            "accuracy": ("accuracy", "Top-1 accuracy"), "top5": ("top-5-accuracy", "Top-5 accuracy"),
            "acc5": ("top-5-accuracy", "Top-5 accuracy")}
_TAGS = ["image-classification", "timm", "binary-neural-network", "reste"]
_PAPER_URL = ("https://openaccess.thecvf.com/content/ICCV2023/html/Wu_Estimator_Meets_Equilibrium_Perspective_"
              "A_Rectified_Straight_Through_Estimator_for_ICCV_2023_paper.html")
# The Hub's generic timm snippet lacks the plugin import, without which timm reports an unknown model.
_USAGE = """## Usage

The architecture is defined by the `reste-timm` plugin: install it, and import it before
`timm.create_model` (without the import, timm reports an unknown model).

```bash
pip install reste-timm
```

```python
import timm
import torch
import reste_timm  # noqa: F401  registers the ReSTE models with timm
from PIL import Image

model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
image = Image.open("image.png").convert("RGB")
with torch.no_grad():
    probs = model(transform(image).unsqueeze(0)).softmax(-1)
```"""
_CITATION = """@inproceedings{wu2023estimator,
  title={Estimator meets equilibrium perspective: A rectified straight through estimator for binary neural networks training},
  author={Wu, Xiao-Ming and Zheng, Dian and Liu, Zuhao and Zheng, Wei-Shi},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision},
  pages={17055--17064},
  year={2023}
}"""  # noqa: E501  (bibtex copied verbatim from the reference README)



def _precision(model_args: Mapping[str, Any]) -> str:
    if "binarize_input" not in model_args:
        return "full precision (32W/32A)"
    if model_args["binarize_input"]:
        return "1-bit weights and activations (1W/1A)"
    return "1-bit weights, full-precision activations (1W/32A)"


def _eval_results(metrics: Mapping[str, Any], dataset: str, dataset_name: str) -> list:
    results = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # model-index holds numbers only; everything is in the results table
        metric_type, metric_name = _METRICS.get(key.lower(), (key, key))
        results.append(EvalResult(task_type="image-classification", task_name="Image Classification",
                                  dataset_type=dataset, dataset_name=dataset_name, dataset_split="test",
                                  metric_type=metric_type, metric_name=metric_name,
                                  metric_value=round(float(value), 4)))
    return results


def render_model_card(config: Mapping[str, Any], metrics: Optional[Mapping[str, Any]] = None,
                      train_config: Optional[Mapping[str, Any]] = None, dataset: Optional[str] = None,
                      repo_id: Optional[str] = None, license: Optional[str] = None,
                      description: Optional[str] = None, results_note: Optional[str] = None,
                      tags: Optional[list] = None) -> str:
    """The ``README.md`` of a saved model, from its ``config.json`` content (see :func:`save_pretrained`)."""
    pcfg, args = config["pretrained_cfg"], config.get("model_args", {})
    tag = pcfg.get("tag") or ""
    name = f"{config['architecture']}.{tag}" if tag else config["architecture"]
    repo_id = repo_id or hub_id(name)
    dataset = dataset or _DATASETS.get(tag, (None,))[0]
    dataset_name = dict(_DATASETS.values()).get(dataset, dataset)
    results = _eval_results(metrics, dataset, dataset_name) if metrics and dataset else None
    data = ModelCardData(  # model_name only names the model-index; alone it would be a stray field
        library_name="timm", license=license or pcfg.get("license") or "apache-2.0",
        tags=_TAGS + list(tags or []), pipeline_tag="image-classification",
        datasets=[dataset] if dataset else None, model_name=name if results else None,
        eval_results=results or None)
    lines = [f"---\n{data.to_yaml()}\n---", f"# Model card for {name}", "",
             description or f"A binary neural network trained with ReSTE ([ICCV 2023]({_PAPER_URL})), "
             "packaged for [timm](https://github.com/huggingface/pytorch-image-models) by `reste-timm`.",
             "", "## Model details", "", f"- **Architecture:** `{config['architecture']}`",
             f"- **Precision:** {_precision(args)}"]
    if "estimator" in args:
        lines.append(f"- **Sign estimator:** `{args['estimator']}`")
    lines += [f"- **Classes:** {config['num_classes']}",
              f"- **Input size:** {' x '.join(str(s) for s in pcfg['input_size'])}"]
    if dataset:
        lines.append(f"- **Dataset:** {dataset_name}")
    lines += ["", _USAGE.format(repo_id=repo_id)]
    if train_config:
        text = yaml.safe_dump(json.loads(json.dumps(dict(train_config), default=str)), sort_keys=False)
        lines += ["", "## Training configuration", "", f"```yaml\n{text.rstrip()}\n```"]
    if metrics:
        lines += ["", "## Results", "", "| Metric | Value |", "| --- | --- |"]
        lines += [f"| {_METRICS.get(k.lower(), (k, k))[1]} | {v} |" for k, v in metrics.items()]
        if results_note:
            lines += ["", results_note]
    lines += ["", "## Citation", "", f"```bibtex\n{_CITATION}\n```", ""]
    return "\n".join(lines)
