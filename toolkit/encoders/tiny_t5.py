"""The tiny T5 of tests and the CPU demo: a random `T5EncoderModel` of the real width and a tokenizer trained here.

No registry ships T5 weights or T5's sentencepiece model, so the tiny text encoder is built from nothing:

1. a sentencepiece unigram model trained (single thread, a fraction of a second) on the English corpus below, with
   T5's special pieces (`<pad>` 0, `</s>` 1, `<unk>` 2), saved and reloaded as a transformers T5 tokenizer;
2. a one-layer `T5EncoderModel` with d_model 1024 (so embeddings have the real `[n, 1024]` shape) whose weights are
   drawn from a seeded numpy generator in sorted parameter order, so they do not depend on transformers' init code.

The folder is built once under `$COSMOS_TOOLKIT_CACHE/tiny_t5/<recipe>` (default `~/.cache/cosmos_lora_toolkit`), in
a temporary folder renamed into place, so parallel processes never see half a folder. The same call on any machine
(same library versions) gives identical weights and token ids.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

CACHE_ENV = "COSMOS_TOOLKIT_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/cosmos_lora_toolkit")
# Bump when the recipe (corpus, sizes, seed, init) changes so old cached folders are not reused.
RECIPE_NAME = "recipe_v1"
SEED = 20250101
SENTENCEPIECE_VOCAB = 900
"""Pieces asked of sentencepiece; the tokenizer adds T5's 100 `<extra_id_*>` tokens on top."""
TINY_CONFIG = dict(
    d_model=1024,  # the real T5-11B width: embeddings keep the shape the DiT expects
    d_kv=32,
    d_ff=64,
    num_layers=1,
    num_heads=2,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="relu",  # T5 v1.0, as t5-11b
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    is_encoder_decoder=False,
    use_cache=False,
)

_SUBJECTS = [
    "a robot arm", "the camera", "a small dog", "two children", "an old man", "a red car", "a teal robot",
    "the delivery truck", "a chef", "a cyclist", "a white cat", "the drone", "a forklift", "a young woman",
    "a humanoid robot", "the gripper", "a sailboat", "a herd of horses", "the train", "a factory worker",
]
_ACTIONS = [
    "picks up a wooden cube from the table", "slowly pans across a busy city street at night",
    "runs through the green grass in the park", "walks along the sandy beach at sunset",
    "drives down a winding mountain road", "places the bottle carefully into a cardboard box",
    "chops fresh vegetables in a bright kitchen", "rides past a row of colourful houses",
    "jumps onto the sofa and falls asleep", "flies over a forest covered with snow",
    "lifts a heavy pallet in the warehouse", "opens the door and steps outside into the rain",
    "folds a blue towel on the counter", "crosses the bridge over a wide river",
    "stacks plastic boxes on a metal shelf", "turns the valve and checks the pressure gauge",
    "sails across the calm lake under a cloudy sky", "gallops across the open field",
    "arrives at the station as people wait on the platform", "inspects the assembly line with a flashlight",
]
_DETAILS = [
    "The lighting is soft and natural.", "The video is shot from a low angle.", "Leaves move gently in the wind.",
    "The scene is captured in high resolution with smooth motion.", "Shadows stretch across the ground.",
    "The background is slightly blurred.", "Traffic lights reflect on the wet pavement.",
    "Birds fly in the distance.", "The motion is steady and realistic.", "A clock ticks on the wall.",
]

_PROSE = [
    "The quick brown fox jumps over the lazy dog; 0123456789, (yes!) \"quoted\" words - and questions?",
    "Pack my box with five dozen liquor jugs: zebras, quails, jackals and oxen wait by the vivid azure pond.",
    "In the morning light, a farmer drives a tractor between long rows of wheat, barley and sunflowers.",
    "Waves crash against the rocky cliffs while seagulls circle above the lighthouse and fishing boats.",
    "A skateboarder performs a kickflip in an empty parking garage, his shoes squeaking on the concrete.",
    "Inside the laboratory, scientists in white coats pipette liquid into glass vials under bright lamps.",
    "The astronaut floats weightlessly through the space station, adjusting equipment with gloved hands.",
    "Rain drips from the umbrella of a pedestrian hurrying past neon signs, puddles and yellow taxis.",
    "An autonomous vehicle navigates a roundabout, yielding to pedestrians and merging smoothly with traffic.",
    "Fireworks explode above the harbour, painting the water with purple, orange and emerald reflections.",
    "A potter shapes wet clay on a spinning wheel, forming a tall vase with thin, elegant walls.",
    "Hikers climb a steep trail through pine trees toward a frozen waterfall glittering in the sun.",
    "The orchestra tunes its violins, cellos and trumpets before the conductor raises the baton.",
    "A mechanical hand grasps an egg without cracking it, then rotates the wrist and releases it gently.",
    "Kids splash in a swimming pool, throwing an inflatable ball while a lifeguard watches from a chair.",
    "Thick fog rolls over the hills at dawn, revealing a village, a church tower and grazing sheep.",
    "A barista pours steamed milk into an espresso cup, drawing a delicate leaf pattern on the surface.",
    "Sparks fly as a welder joins two steel beams on the construction site of a new skyscraper.",
    "A jellyfish drifts through the dark ocean, its translucent body glowing with pulsing blue light.",
    "The quadruped robot trots over uneven gravel, balancing on three legs when one foot slips.",
    "Autumn leaves swirl around an abandoned playground, where a swing sways back and forth by itself.",
    "A baker kneads dough, sprinkles flour on the marble counter and slides loaves into the oven.",
    "Commuters rush through the subway turnstiles during the evening rush hour, checking their phones.",
    "A hummingbird hovers beside a red flower, wings beating so fast they become a blur.",
    "Snowflakes settle on the windshield as the wipers sweep back and forth on a quiet highway.",
    "The gymnast vaults over the apparatus, twisting twice before landing firmly on the mat.",
    "An excavator digs a trench, swinging its bucket and dumping soil into a waiting truck.",
    "Candles flicker on a birthday cake as friends sing and clap around the dining table.",
    "A kayaker paddles through rapids, dodging boulders and spray in a narrow canyon.",
    "Time-lapse footage shows clouds racing over the desert while shadows sweep across the dunes.",
]


def tiny_corpus() -> list[str]:
    """The built-in training text: prose covering every letter, digit and common punctuation, plus every subject
    with every action and a rotating detail sentence."""
    sentences = list(_PROSE)
    for subject_index, subject in enumerate(_SUBJECTS):
        for action_index, action in enumerate(_ACTIONS):
            detail = _DETAILS[(subject_index + action_index) % len(_DETAILS)]
            sentences.append(f"{subject[0].upper()}{subject[1:]} {action}. {detail}")
    return sentences


def tiny_t5_cache_root() -> Path:
    """`$COSMOS_TOOLKIT_CACHE/tiny_t5`, read at call time so tests can point it at a temporary folder."""
    root = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()
    return root / "tiny_t5"


def build_tiny_t5(cache_root: Path | None = None) -> Path:
    """The tiny T5 folder (config.json, model.safetensors, spiece.model, tokenizer files), built first if absent."""
    root = Path(cache_root) if cache_root is not None else tiny_t5_cache_root()
    folder = root / RECIPE_NAME
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{RECIPE_NAME}-building-", dir=root))
    try:
        _write_tiny_t5(staging)
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():  # the rename failed for a reason other than a parallel builder winning
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_tiny_t5(folder: Path) -> None:
    """Train the tokenizer, build the seeded encoder and save both into `folder`."""
    # 1. Tokenizer: sentencepiece model -> transformers T5 tokenizer saved next to it (adds tokenizer.json).
    (folder / "spiece.model").write_bytes(_train_sentencepiece(tiny_corpus()))
    tokenizer = T5TokenizerFast.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    # 2. Encoder: the vocabulary covers the sentencepiece pieces and the extra ids.
    config = T5Config(vocab_size=len(tokenizer), **TINY_CONFIG)
    model = T5EncoderModel(config)
    _fill_seeded_weights(model, config)
    model.save_pretrained(str(folder), safe_serialization=True)


def _train_sentencepiece(sentences: list[str]) -> bytes:
    """Serialised unigram sentencepiece model with T5's special-piece layout; single thread for determinism."""
    model_bytes = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model_bytes,
        vocab_size=SENTENCEPIECE_VOCAB,
        hard_vocab_limit=False,  # a small corpus may support fewer pieces; the config follows the real count
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    return model_bytes.getvalue()


def _fill_seeded_weights(model: T5EncoderModel, config: T5Config) -> None:
    """Overwrite every parameter from one seeded numpy stream, with T5's initialisation scales."""
    generator = np.random.default_rng(SEED)
    d_model, d_kv, num_heads, d_ff = config.d_model, config.d_kv, config.num_heads, config.d_ff
    scales = {
        "shared": 1.0,
        ".q.": (d_model * d_kv) ** -0.5,
        ".k.": d_model**-0.5,
        ".v.": d_model**-0.5,
        ".o.": (num_heads * d_kv) ** -0.5,
        "relative_attention_bias": d_model**-0.5,
        ".wi.": d_model**-0.5,
        ".wo.": d_ff**-0.5,
    }
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "layer_norm" in name:
                parameter.fill_(1.0)
                continue
            matches = [scale for key, scale in scales.items() if key in name]
            assert len(matches) == 1, f"no single init scale for tiny T5 parameter {name}"
            values = generator.standard_normal(tuple(parameter.shape), dtype=np.float32) * np.float32(matches[0])
            parameter.copy_(torch.from_numpy(values))
