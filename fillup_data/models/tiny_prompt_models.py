"""Tiny random-weight prompt models for the offline tests and demo: ``builtin:tiny-t5`` (seq2seq) and
``builtin:tiny-gpt2`` (causal) for ``lm_prompts``, ``builtin:tiny-blip`` (BLIP captioner) for ``captions``.

Like ``builtin:tiny-sd`` they are built from configs with seeded random weights, saved with
``save_pretrained`` into ``$FILLUP_CACHE/models`` and loaded back through the same
``from_pretrained(folder)`` a user's hub id takes (``models.prompt_models``).  Their text is gibberish,
deterministic and made only of printable ASCII: the tokenizer has no files to download, its vocabulary
is the byte-level symbols of the 95 printable ASCII characters plus the special tokens each model family
expects.  A cached folder is reused while its record (builder version, every file's sha256) holds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fillup_data.models.built_folder import folder_digests

# Bump when what a builder writes changes: cached folders made by older code are rebuilt.
BUILDER_VERSION = 1
RECORD = "fillup_builtin.json"
_SEED = 0


def _byte_level_symbol(b: int) -> str:
    """The byte-level (GPT-2) symbol of byte ``b``: printable bytes are themselves, the rest 256 + b."""
    return chr(b) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255 else chr(256 + b)


def build_tokenizer(specials: list[str], *, append_eos: str | None = None, **special_roles):
    """A file-less byte-level BPE tokenizer: ``specials`` first (ids 0..), then printable ASCII.
    ``append_eos`` adds that token after every encoded text (T5 does); bytes outside printable ASCII
    encode as the unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(32, 127):
        vocab[_byte_level_symbol(b)] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=special_roles.get("unk_token")))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if append_eos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"$A {append_eos}", pair=f"$A {append_eos} $B {append_eos}",
            special_tokens=[(append_eos, vocab[append_eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=128, **special_roles)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    tok = build_tokenizer(["<pad>", "</s>", "<unk>"], append_eos="</s>", pad_token="<pad>", eos_token="</s>",
                          unk_token="<unk>")
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, num_heads=2, d_ff=64, num_layers=2,
                   num_decoder_layers=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg), tok


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer(["<|endoftext|>"], bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                          unk_token="<|endoftext|>")
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg), tok


def _blip():
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = build_tokenizer(["[PAD]", "[UNK]", "[DEC]", "[SEP]"], pad_token="[PAD]", unk_token="[UNK]",
                          bos_token="[DEC]", sep_token="[SEP]", eos_token="[SEP]")
    # initializer_range 0.2 (BLIP's is 0.02): with smaller random weights every image gets the same caption
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64, bos_token_id=2, sep_token_id=3, pad_token_id=0, eos_token_id=3,
                encoder_hidden_size=32, initializer_range=0.2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, initializer_range=0.2)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32,
                                                    initializer_range=0.2))
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    return model, processor


# alias -> (builder, cache folder name)
TINY_PROMPT_MODELS = {
    "builtin:tiny-t5": (_t5, "tiny-t5-v1"),
    "builtin:tiny-gpt2": (_gpt2, "tiny-gpt2-v1"),
    "builtin:tiny-blip": (_blip, "tiny-blip-v1"),
}


def _identity(alias: str) -> str:
    import transformers

    # the weights and files depend on the transformers release that initialises and saves them
    return hashlib.sha256(f"{alias} builder {BUILDER_VERSION} seed {_SEED} transformers "
                          f"{transformers.__version__}".encode()).hexdigest()


def is_intact(dest: Path, alias: str) -> bool:
    """``dest`` was built by this builder and every file it recorded still has its sha256."""
    from fillup_data.state import read_json_record

    record = read_json_record(Path(dest) / RECORD)
    if record is None or record.get("builder") != _identity(alias) or not isinstance(record.get("files"), dict):
        return False
    return bool(record["files"]) and record["files"] == folder_digests(Path(dest), RECORD)


def build_tiny_prompt_model(alias: str, path: Path) -> None:
    """Build ``alias`` with seeded weights (the caller's RNG untouched) and save it at ``path``."""
    builder, _ = TINY_PROMPT_MODELS[alias]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model, preprocessor = builder()
    model.save_pretrained(str(path))
    preprocessor.save_pretrained(str(path))


def tiny_prompt_model_folder(alias: str, cache: Path) -> Path:
    """The folder of ``alias`` under ``cache``, built once (atomically: a temporary sibling renamed into
    place, so a crash or a concurrent builder never leaves half a model where ``from_pretrained`` looks)."""
    from fillup_data.models.built_folder import install_built_folder

    dest = Path(cache) / TINY_PROMPT_MODELS[alias][1]
    if is_intact(dest, alias):
        return dest

    def build_into(tmp: Path) -> dict:
        build_tiny_prompt_model(alias, tmp)
        return {"alias": alias, "builder": _identity(alias)}

    return install_built_folder(dest, build_into, RECORD, lambda d: is_intact(d, alias))
