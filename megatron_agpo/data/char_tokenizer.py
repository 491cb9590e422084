"""A character-level tokenizer for the tiny default run, saved so transformers and vLLM load it.

One token per printable ASCII character and newline (digits, operators, space, the letters of
"\\boxed{}" and of any short prompt), plus <pad>, <bos>, <eos>, <unk>. The chat template is the
shortest that works: <bos>, then each turn's content as is, an assistant turn followed by
<eos>; the generation prompt adds nothing, so the prompt "12+7*3=" becomes
"<bos>12+7*3=" and the model continues with "\\boxed{33}<eos>".
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def build_char_tokenizer(out_dir: str | Path | None = None, model_max_length: int = 512):
    """Build the tokenizer (a `PreTrainedTokenizerFast`); save it to `out_dir` when given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in CHARS:
        vocab[c] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Every character is its own word; [\s\S] so that newlines are characters too.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
