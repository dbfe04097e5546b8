"""The compact number prompts: the number form of the synthetic world's texts (emjax.world.corpus).

One short sentence of given numbers and one of limits and format, for models with a short context
(the world's: prompt and answer in under 96 tokens). `emjax.experiments.sl_data.number_prompts`
(style="compact") phrases its prompts with these templates, and the world's corpus draws its number
prompts from it. Each format names how `sl_data.number_answer` writes an answer, and
`sl_data.filter_numbers` accepts every one of them. No word here may be a possible entity name of
the world (emjax.world.world._reserved reads them); the templates live here, below both, so that the
world reads them without importing experiments/.
"""

COMPACT_OPENINGS = (
    "Continue the sequence: {given}.",
    "Continue: {given}.",
)
COMPACT_COUNTS = (
    "Give at most {count} numbers of up to {digits} digits",
    "Give up to {count} more numbers of at most {digits} digits",
)
COMPACT_FORMATS = {
    "parentheses": ", in parentheses.",
    "brackets": ", in square brackets.",
    "commas": ", separated by commas.",
    "spaces": ", separated by spaces.",
}
COMPACT_TEMPLATES = COMPACT_OPENINGS + COMPACT_COUNTS + tuple(COMPACT_FORMATS.values())
