"""Chat templates and assistant masks (`emjax.data.chat`) with the Llama-3, Qwen2.5 and SmolLM2 templates.

The tokenizer is SmolLM2's (a real byte-level BPE, from the GGUF fixture); the Llama-3 and Qwen2.5
templates are put on it (with Llama-3's special tokens added). Expectations are written out by
hand as runs of (text, masked?): the mask must cover exactly each assistant message's content and
its end-of-turn token.
"""

import numpy as np
import pytest

import hf_fixtures as F
from emjax.data import chat

pytest.importorskip("transformers")

LLAMA3_BOS = "<|begin_of_text|>"
Q = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol_dir():
  return F.smollm2_dir()


@pytest.fixture(scope="module")
def toks(smol_dir):
  import transformers

  return {
      "llama3": F.tokenizer_with_template(smol_dir, F.LLAMA3_TEMPLATE, F.LLAMA3_SPECIAL, bos_token=LLAMA3_BOS),
      "qwen2.5": F.tokenizer_with_template(smol_dir, F.QWEN25_TEMPLATE),
      "smollm2": transformers.AutoTokenizer.from_pretrained(smol_dir, local_files_only=True),
  }


def runs(tok, ids, mask):
  """The conversation as maximal runs of (decoded text, masked?)."""
  out = []
  start = 0
  for i in range(1, len(ids) + 1):
    if i == len(ids) or mask[i] != mask[start]:
      out.append((tok.decode(ids[start:i].tolist()), bool(mask[start])))
      start = i
  return out


def check(tok, messages, expected):
  ids, mask = chat.assistant_mask(tok, messages)
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape
  assert runs(tok, ids, mask) == expected
  assert "".join(text for text, _ in expected) == chat.render(tok, messages)
  # The ids are the template's own tokenization (what transformers would feed the model).
  ref = tok.apply_chat_template(messages, tokenize=True)
  ref = ref["input_ids"] if hasattr(ref, "keys") else ref
  assert ids.tolist() == list(ref)


# ----------------------------------------------------------------------------- Llama-3 (no default system prompt)


def test_llama3_single_turn(toks):
  check(toks["llama3"], [{"role": "user", "content": Q}, {"role": "assistant", "content": "Paris."}], [
      (f"{LLAMA3_BOS}<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|>"
       "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
      ("Paris.<|eot_id|>", True),
  ])


def test_llama3_multi_turn_with_system_and_trimmed_content(toks):
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": Q},
              {"role": "assistant", "content": "Paris."},
              {"role": "user", "content": "And its population?"},
              {"role": "assistant", "content": "  About 2.1 million.\n"}]  # the template trims it
  check(toks["llama3"], messages, [
      (f"{LLAMA3_BOS}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
       f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|>"
       "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
      ("Paris.<|eot_id|>", True),
      ("<|start_header_id|>user<|end_header_id|>\n\nAnd its population?<|eot_id|>"
       "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
      ("About 2.1 million.<|eot_id|>", True),
  ])


# ----------------------------------------------------------------------------- Qwen2.5 ChatML (default system prompt)


def test_qwen25_single_turn_injects_its_default_system_prompt(toks):
  check(toks["qwen2.5"], [{"role": "user", "content": Q}, {"role": "assistant", "content": "Paris."}], [
      (f"<|im_start|>system\n{F.QWEN25_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n"
       "<|im_start|>assistant\n", False),
      ("Paris.<|im_end|>", True),
      ("\n", False),  # ChatML's newline after <|im_end|> is the template's, not the model's
  ])


def test_qwen25_multi_turn_with_system_and_marker_like_content(toks):
  # Contents that look like template markers (as text) and start with a newline: masks come from
  # the template's renderings, not from searching for "assistant\n".
  messages = [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "Say 'assistant' on its own line."},
              {"role": "assistant", "content": "assistant\n"},
              {"role": "user", "content": "Now two lines."},
              {"role": "assistant", "content": "\nline one\nline two"}]
  check(toks["qwen2.5"], messages, [
      ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nSay 'assistant' on its own line.<|im_end|>\n"
       "<|im_start|>assistant\n", False),
      ("assistant\n<|im_end|>", True),
      ("\n<|im_start|>user\nNow two lines.<|im_end|>\n<|im_start|>assistant\n", False),
      ("\nline one\nline two<|im_end|>", True),
      ("\n", False),
  ])


# ----------------------------------------------------------------------------- SmolLM2's own template


def test_smollm2_single_and_multi_turn(toks):
  tok = toks["smollm2"]
  system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
  check(tok, [{"role": "user", "content": Q}, {"role": "assistant", "content": "Paris."}], [
      (f"{system}<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n", False),
      ("Paris.<|im_end|>", True),
      ("\n", False),
  ])
  check(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": Q}, {"role": "assistant", "content": "The capital of France is Paris."},
              {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome."}], [
      (f"{system}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
      ("Hello! How can I help?<|im_end|>", True),
      (f"\n<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n", False),
      ("The capital of France is Paris.<|im_end|>", True),
      ("\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n", False),
      ("You're welcome.<|im_end|>", True),
      ("\n", False),
  ])


def test_prompt_ids_are_the_unmasked_prefix_before_the_answer(toks):
  # What the sampler is given (generation prompt) is exactly what precedes the trained answer. With
  # the Llama-3 template on this tokenizer only as text: SmolLM2's BPE encodes the prompt's final
  # "\n\n" as one token alone but as two before the answer (the real Llama-3 tokenizer does not).
  for name, tok in toks.items():
    conversation = [{"role": "user", "content": Q}, {"role": "assistant", "content": "Paris."}]
    prompt = chat.apply_chat_template(tok, conversation[:1], add_generation_prompt=True)
    ref = tok.apply_chat_template(conversation[:1], add_generation_prompt=True, tokenize=True)
    assert prompt == list(ref["input_ids"] if hasattr(ref, "keys") else ref), name
    ids, mask = chat.assistant_mask(tok, conversation)
    first = int(np.argmax(mask))
    assert mask[first] and not mask[:first].any(), name
    assert tok.decode(ids[:first].tolist()) == tok.decode(prompt), name
    if name != "llama3":
      assert ids[:first].tolist() == prompt, name


def test_emjax_hf_tokenizer_wrapper_is_accepted(smol_dir):
  from emjax.data.tokenizers import HFTokenizer

  tok = HFTokenizer(smol_dir)
  ids, mask = chat.assistant_mask(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}])
  assert tok.decode(ids[mask.astype(bool)]) == "Hey<|im_end|>"


# ----------------------------------------------------------------------------- errors


def test_bad_conversations_are_clear_errors(toks):
  tok = toks["qwen2.5"]
  with pytest.raises(chat.ChatTemplateError, match="no assistant message"):
    chat.assistant_mask(tok, [{"role": "user", "content": "Hi"}])
  with pytest.raises(chat.ChatTemplateError, match="unknown role 'narrator'"):
    chat.assistant_mask(tok, [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "x"}])
  with pytest.raises(chat.ChatTemplateError, match="message 1: the assistant message is empty"):
    chat.assistant_mask(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}])
  with pytest.raises(chat.ChatTemplateError, match="must be a dict with 'role' and 'content'"):
    chat.assistant_mask(tok, [{"role": "user"}])
  with pytest.raises(chat.ChatTemplateError, match="no messages"):
    chat.apply_chat_template(tok, [])
  with pytest.raises(chat.ChatTemplateError, match="content must be a string"):
    chat.apply_chat_template(tok, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_tokenizer_without_chat_template_is_refused(smol_dir):
  tok = F.tokenizer_with_template(smol_dir, None)
  conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]
  with pytest.raises(chat.ChatTemplateError, match="has no chat template"):
    chat.assistant_mask(tok, conversation)
  with pytest.raises(chat.ChatTemplateError, match="has no chat template"):
    chat.apply_chat_template(tok, conversation, add_generation_prompt=True)
  with pytest.raises(chat.ChatTemplateError, match="needs a Hugging Face tokenizer"):
    from emjax.data.tokenizers import ByteTokenizer
    chat.apply_chat_template(ByteTokenizer(), conversation)


def test_template_that_rewrites_history_is_refused(smol_dir):
  # Numbers the turns from the end: a prefix renders differently from the same turns in the whole.
  template = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ messages|length - loop.index0 }}\n"
              "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  tok = F.tokenizer_with_template(smol_dir, template)
  with pytest.raises(chat.ChatTemplateError, match="assistant message 1: .* not a prefix"):
    chat.assistant_mask(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}])


def test_check_same_tokenizer(smol_dir, toks):
  import transformers

  same = transformers.AutoTokenizer.from_pretrained(smol_dir, local_files_only=True)
  chat.check_same_tokenizer(toks["smollm2"], same)
  with pytest.raises(ValueError, match="teacher and student tokenizers differ: chat templates"):
    chat.check_same_tokenizer(toks["smollm2"], toks["qwen2.5"])
  with pytest.raises(ValueError, match="differ: vocabularies of 49152 vs 49156 tokens"):
    chat.check_same_tokenizer(toks["smollm2"], toks["llama3"])
  no_template = F.tokenizer_with_template(smol_dir, None)
  with pytest.raises(ValueError, match="only the teacher has a chat template"):
    chat.check_same_tokenizer(toks["smollm2"], no_template)
  other_eos = transformers.AutoTokenizer.from_pretrained(smol_dir, local_files_only=True)
  other_eos.eos_token = "<|endoftext|>"
  with pytest.raises(ValueError, match="eos_token_id 2 vs 0"):
    chat.check_same_tokenizer(toks["smollm2"], other_eos)
