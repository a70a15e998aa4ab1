"""The README's example SPEC and ``lorafuse sweep --write-example DIR``: the SPEC plus everything it
names (two subject and two style LoRAs for the embedded tiny pipeline, reference images), so that the
example runs as written, offline, in about a minute on a CPU."""

from __future__ import annotations

from pathlib import Path

EXAMPLE_SPEC = """\
# lorafuse sweep SPEC: 2 subjects x 2 styles x 1 prompt x 5 methods x 2 seeds = 40 images
model: lorafuse:tiny-sd15        # a local diffusers folder (/models/sdxl-base) or a hub id in real use
dtype: float32                   # default: float16 on CUDA, float32 on CPU
steps: 4
guidance_scale: 7.5
height: 32
width: 32
subjects:
  - name: dog
    file: loras/dog.safetensors
    trigger: sks dog             # replaces {subject} in the prompts
    text: a dog                  # replaces {subject} in the text-alignment prompt (default: trigger)
    references: refs/dog         # folder of images: subject fidelity (DINO)
  - name: cat
    file: loras/cat.safetensors
    trigger: sks cat
    text: a cat
    references: refs/cat
styles:
  - name: ink
    file: loras/ink.safetensors
    trigger: in ink wash style   # replaces {style}
    reference: refs/ink.png      # image (or folder): style fidelity (CLIP)
  - name: oil
    file: loras/oil.safetensors
    trigger: in oil painting style
    reference: refs/oil.png
prompts:
  - "a photo of {subject} on a beach, {style}"
methods:
  - klora                        # K-LoRA, the official scripts' pattern s*
  - klora pattern=s
  - est D=auto                   # EST-LoRA with the style-discrepancy probe (uses scorers.dino)
  - kl
  - merge
seeds: [0, 1]
scorers:                         # local folders in real use: clip: /models/clip-vit-large-patch14
  clip: lorafuse:tiny-clip       #                           dino: /models/dino-vits16
  dino: lorafuse:tiny-dino
  batch_size: 16
output: example-sweep
"""

LORAS = {"dog": (4, 1, 0.10), "cat": (4, 3, 0.10), "ink": (8, 2, 0.06), "oil": (8, 4, 0.06)}  # rank, seed, scale


def write_loras_and_refs(folder: Path, names=tuple(LORAS), size: str = "tiny") -> None:
    """Random LoRAs on every attention projection of the embedded pipeline's UNet, and random
    reference images: ``loras/<name>.safetensors``, ``refs/<subject>/{0,1}.png``, ``refs/<style>.png``."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from ..integrations.tiny import lora_state_dict, sd15_pipeline

    folder = Path(folder)
    (folder / "loras").mkdir(parents=True, exist_ok=True)
    unet = sd15_pipeline(size).unet
    rng = np.random.default_rng(0)
    for name in names:
        rank, seed, scale = LORAS[name]
        sd = lora_state_dict(unet, "unet", rank, seed=seed, scale=scale)
        save_file(sd, str(folder / "loras" / f"{name}.safetensors"))
        if name in ("dog", "cat"):
            (folder / "refs" / name).mkdir(parents=True, exist_ok=True)
            for j in range(2):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / "refs" / name / f"{j}.png")
        else:
            (folder / "refs").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 32, 3), dtype=np.uint8)).save(folder / "refs" / f"{name}.png")


def write_example(folder) -> Path:
    """Write the example into ``folder`` and return the SPEC's path."""
    folder = Path(folder)
    write_loras_and_refs(folder)
    spec = folder / "spec.yaml"
    spec.write_text(EXAMPLE_SPEC)
    return spec
