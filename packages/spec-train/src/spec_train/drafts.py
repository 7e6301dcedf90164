"""What every algorithm's build_draft uses: a draft loaded to fine-tune (--init-from) and the draft
vocabulary of a new one."""

from __future__ import annotations

import msgspec

from spec_format.checkpoint import SpecMetadata
from spec_format.dataset import Dataset
from spec_format.errors import SpecError
from spec_format.fingerprint import fingerprint_model_dir
from spec_format.vocab import VocabMapping, build_vocab_mapping
from spec_train import distributed
from spec_train.config import DEFAULT_DRAFT_VOCAB, TrainConfig
from spec_train.data import layer_indices, supervised_token_counts, training_split


def load_init_draft(cfg: TrainConfig, ds: Dataset):
    """cfg.init_from loaded to fine-tune: (draft, aux_idx, last_idx). It must have been made for this
    verifier; its checkpoint will serve k = ttt_steps and name the verifier trained against."""
    from spec_models import load

    vinfo = fingerprint_model_dir(cfg.verifier, name_or_path=cfg.verifier_name)
    draft = load(cfg.init_from, verifier=cfg.verifier)
    dcfg = draft.config
    known = dcfg.spec.verifier if dcfg.spec else None
    problems = known.mismatches(vinfo) if known else []
    lc = dcfg.transformer_layer_config
    if lc.get("vocab_size") != vinfo.vocab_size:
        problems.append(f"vocab_size: {lc.get('vocab_size')} != {vinfo.vocab_size}")
    if problems:
        raise SpecError(f"{cfg.init_from}: this draft was made for another verifier than {cfg.verifier} "
                        f"({'; '.join(problems)} [draft != verifier])")  # fmt: skip
    if cfg.draft_vocab_size not in (None, dcfg.draft_vocab_size or vinfo.vocab_size):
        raise SpecError(f"--draft-vocab-size {cfg.draft_vocab_size}: the draft in {cfg.init_from} has "
                        f"{dcfg.draft_vocab_size}; a fine-tuned draft keeps its vocabulary")  # fmt: skip
    aux_idx, last_idx = layer_indices(ds, dcfg.aux_layer_ids, cfg.verifier)
    sc = dcfg.speculators_config
    sc = msgspec.structs.replace(
        sc,
        proposal_methods=[msgspec.structs.replace(sc.proposal_methods[0], speculative_tokens=cfg.ttt_steps)],
        verifier=msgspec.structs.replace(sc.verifier, name_or_path=vinfo.name_or_path),
    )
    spec = msgspec.structs.replace(dcfg.spec or SpecMetadata(), verifier=vinfo)
    draft.config = msgspec.structs.replace(dcfg, speculators_config=sc, spec=spec)
    return draft, aux_idx, last_idx


def draft_vocabulary(cfg: TrainConfig, ds: Dataset, d: distributed.Dist) -> VocabMapping | None:
    """The draft vocabulary of a new draft: the most frequent supervised tokens (None: the full one)."""
    V = fingerprint_model_dir(cfg.verifier).vocab_size
    size = cfg.draft_vocab_size or min(DEFAULT_DRAFT_VOCAB, V)
    if size > V:
        raise SpecError(f"--draft-vocab-size {size} is larger than the verifier's vocabulary ({V})")
    if size == V:
        return None
    if cfg.max_train_samples is None:
        counts = ds.token_frequencies(V)
    else:  # a part of the dataset: its own tokens, not those of samples it never trains on
        counts = supervised_token_counts(ds, training_split(cfg, len(ds)).train, V)
    mapping = build_vocab_mapping(counts, size)
    if mapping.num_unseen:
        d.say(f"warning: only {size - mapping.num_unseen} distinct supervised tokens in the data; the draft "
                f"vocabulary of {size} is filled with {mapping.num_unseen} unseen ids (lowest ids first)")  # fmt: skip
    return mapping
