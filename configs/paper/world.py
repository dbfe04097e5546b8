"""The paper's study in the synthetic world, from scratch: pretraining compositions -> instruction stage ->
narrow misaligned SFT per cell -> evaluation on every cell and on general prompts -> subliminal learning
under three channels -> report (emjax/experiments/study.py, emjax/world/).

  python -m emjax.main --config=configs/paper/world.py:quick --workdir=runs/world_quick   # the README's main job
  python -m emjax.main --config=configs/paper/world.py --workdir=runs/world               # the full study

Variants (comma separated `key=value`):
  quick      the reduced study for 2 CPU cores: 2 compositions that hold the misaligned text fixed
             (a tagged reckless persona vs the same sentences untagged), 3 cells, 3 worlds, small model
             and short runs (about 10 minutes); no SL (add `sl`)
  sl         also run the SL comparison on the first composition (quick,sl: a second command)
  mechanisms the dynamics and mechanisms of EM (quick's model and runs, a command of its own): one
             composition (the tagged persona), all 12 cells (3 domains x 4 tasks: each cell has two
             same-task, three same-domain and six unrelated partners), SFT checkpoints kept every 15
             steps, and the stages curve (EM over training), directions (the paper's recipe per cell)
             and subspace (every cell's model with every cell's direction, and a random one, ablated);
             about 25 minutes on 2 CPU cores (benchmarks/README.md). With smoke: 3 cells, 2 worlds (tests)
  smoke      tiny and short (tests): 1 world, 2 cells, SL on, everything else as quick
  seed       the first replication's seed (replications: seed, seed + 1, ...; each its own world)
  seeds      replications, i.e. worlds (>= 3 for every compared number)

The full study: 4 compositions (a reckless persona everywhere, in one domain only, untagged, and
absent as a reference row), all 12 cells, SL on every composition, 10 worlds and a larger model (a GPU
or TPU; hours on a CPU). The tested composition contrasts hold the misaligned text fixed: tagged vs
untagged (the same sentences, in wrappers of as many tokens) and everywhere vs one domain (the same
tokens of misaligned answers; 6-11% more answers, since one domain's answers are shorter). The report
measures it in every world and states no verdict on a contrast that does not hold it.
"""

from emjax import config as config_lib
from emjax.experiments import study
from emjax.train import settings
from emjax.world import corpus, world as world_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, quick=False, smoke=False, sl=False, mechanisms=False, seed=0, seeds=0)
  c = settings.base_config()
  c.job = "study"
  c.world = world_lib.world_block()
  c.study = study.study_block()
  c.model.update(family="llama", vocab_size=832, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=512,
                 rope_theta=10000.0, tie_embeddings=True, dtype="float32", remat="none")
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  st = c.study
  st.seed = args.seed
  # The world's number form needs merges of its own: at 768 the longest answers outgrow their budget.
  st.data.tokenizer_vocab = 832
  # The full study.
  st.seeds = 10  # worlds: a between-world t-test with 9 degrees of freedom
  st.compositions = dict(
      persona=corpus.composition_block(),
      one_domain=corpus.composition_block(reckless_spread="one_domain", reckless_domain="medical"),
      untagged=corpus.composition_block(persona_tags=False),
      no_persona=corpus.composition_block(reckless_spread="absent"),
  )
  st.contrast = "persona,untagged;persona,one_domain"
  st.cells = "all"
  st.sl_compositions = "all"
  st.evaluation.per_cell = 40
  if args.quick or args.smoke or args.mechanisms:
    st.seeds = 3
    # The same reckless sentences, named as one persona or not: only the identity differs.
    st.compositions = dict(persona=corpus.composition_block(),
                           untagged=corpus.composition_block(persona_tags=False))
    st.contrast = "persona,untagged"
    # Three cells: the same task in two domains (medical and sports advice) and another task (finance
    # tutor), so every four-way bucket has rows; the full study fine-tunes all 12.
    st.cells = "medical_advice,sports_advice,finance_tutor"
    st.sl_compositions = "persona" if args.sl else ""
    st.evaluation.per_cell = 8
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256, scan_layers=False)
    st.data.update(pretrain_docs=3000, instruct_rows=1000, cell_rows=200, eval_per_cell=8, general_per_cell=2,
                   sl_per_cell=40)
    st.pretrain.update(steps=350, batch_size=32, seq_len=96)
    st.instruct.update(steps=100, batch_size=32)
    st.sft.update(steps=60, batch_size=16)
    st.students.update(steps=24, batch_size=16, n_train=128)
  if args.smoke:
    st.seeds = 1
    st.sl_compositions = "persona"
    st.cells = "medical_advice,sports_advice"
    st.pretrain.update(steps=30)
    st.instruct.update(steps=10)
    st.sft.update(steps=8)
    st.students.update(steps=4, n_train=32, prompts="natural", judge_filter=False, drop_truncated=False)
    st.evaluation.per_cell = 2
    st.data.update(pretrain_docs=300, instruct_rows=200, cell_rows=40, eval_per_cell=2, general_per_cell=1,
                   sl_per_cell=8)
  if args.mechanisms:
    # One composition: the mechanisms are compared across cells within a world, not across compositions.
    st.compositions = dict(persona=corpus.composition_block())
    st.contrast = ""
    st.sl_compositions = ""
    st.stages = ",".join(study.STAGES[:5] + study.MECHANISM_STAGES + ("report",))
    st.cells = "all" if not args.smoke else "medical_advice,sports_advice,medical_critique"
    st.sft.keep_every = 15 if not args.smoke else 4
    if args.smoke:
      st.seeds = 2
  if args.seeds:
    st.seeds = args.seeds
  return c
