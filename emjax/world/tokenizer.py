"""The world's tokenizer: a byte-level BPE trained on the world's text, saved as a Hugging Face tokenizer.

A Hugging Face directory (tokenizer.json + tokenizer_config.json with a ChatML chat template), so
that the chat masks, the sampler's chat prompts, the eval job and distillation treat models trained
from scratch exactly like imported ones (`data.tokenizer.kind='hf'`). Byte-level, so any text
round-trips; the world's words and names become single tokens once the vocabulary covers them.

Written into every world directory by `emjax.world.corpus.write_world` (the study's world stage).
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, TURN_START, TURN_END)
CHAT_TEMPLATE = ("{% for message in messages %}" + TURN_START + "{{ message['role'] }}\n{{ message['content'] }}"
                 + TURN_END + "\n{% endfor %}{% if add_generation_prompt %}" + TURN_START + "assistant\n{% endif %}")


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
  """The text CHAT_TEMPLATE renders (pretraining dialogues are written in exactly the chat format)."""
  text = "".join(f"{TURN_START}{m['role']}\n{m['content']}{TURN_END}\n" for m in messages)
  return text + (f"{TURN_START}assistant\n" if add_generation_prompt else "")


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 768) -> str:
  """Trains the BPE on `texts`, writes the Hugging Face directory `out_dir` (atomically); returns it."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 additional_special_tokens=[TURN_START, TURN_END])
  fast.chat_template = CHAT_TEMPLATE
  tmp = f"{out_dir}.tmp"
  fast.save_pretrained(tmp)
  if os.path.isdir(out_dir):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return out_dir
