"""Building a training run's pieces from its RunConfig: the start checkpoint, the model at its starting weights,
the training data and its sampler, the validation set, and the wandb run."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from torch.utils.data import DataLoader

from data_pipeline.dataset import Batch, VLMDataset, collate
from data_pipeline.feature_store import FeatureStore
from data_pipeline.records import DataError
from data_pipeline.samplers import LengthGroupedSampler, ResumableSampler
from checkpoints.checkpoint import Checkpoint, config_from_checkpoint, load_weights, read_checkpoint
from model.config import LMConfig
from checkpoints.config_inference import has_projection_bias
from checkpoints.tokenizer import image_pad_id, image_token_ids
from model.vision import VisionEncoder
from model.vlm import MiniMindVLM

from .config import ConfigError, RunConfig, Stage, checkpoint_stem, model_size
from .distributed import Distributed
from .step import apply_freeze
from .validation import Validator

log = logging.getLogger("minimind")


def start_checkpoint(args: RunConfig, stage: Stage) -> Optional[Checkpoint]:
    """The checkpoint this stage starts from (file or model directory), or None with --from_scratch."""
    if args.from_scratch:
        return None
    name = f"{stage.v3_init}_{checkpoint_stem(args)}.pth" if args.generation == "3v" else \
        f"{checkpoint_stem(args)}{stage.init_suffix}.pth"  # 3v: upstream's names (llm_768.pth, pretrain_vlm_768.pth)
    init_path = args.init or os.path.join(args.out_dir, name)
    if not os.path.exists(init_path):
        raise FileNotFoundError(f"start checkpoint not found: {init_path}. {stage.init_hint}, pass --init PATH, "
                                f"or --from_scratch to start from random weights")
    return read_checkpoint(init_path)


def resolve_generation(args: RunConfig, stage: Stage) -> tuple[RunConfig, Optional[Checkpoint]]:
    """(the run's flags as its generation runs them, its start checkpoint). The generation is --generation, else
    the start checkpoint's, else v1; a start checkpoint of the other generation is refused in one line. A 3v run
    takes its size, where no size flag says, from the start checkpoint (RunConfig.for_generation)."""
    told = args.generation
    init = start_checkpoint(args.for_generation(stage, "3v") if told == "3v" else args, stage)
    found = init.stored.get("generation", "v1") if init is not None else None
    if told and found and told != found:
        raise ConfigError(f"--generation {told}, but the start checkpoint {init.path} is a "
                          f"{'minimind-3v' if found == '3v' else 'v1'} checkpoint")
    generation = told or found or "v1"
    size = None
    if generation == "3v" and init is not None:
        config, _ = config_from_checkpoint(init)
        size = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
                "n_kv_heads": config.n_kv_heads, "use_moe": config.use_moe}
    return args.for_generation(stage, generation, size), init


def build_model(args: RunConfig, stage: Stage, tokenizer, encoder: VisionEncoder,
                init: Optional[Checkpoint]) -> MiniMindVLM:
    """The model at its starting weights (`init`, the stage's start checkpoint, unless --from_scratch), frozen per
    policy."""
    init_sd = init.state_dict if init is not None else None
    if args.generation == "3v":  # the RoPE tables keep 3v's length (a checkpoint's sidecar records it for chat)
        size = model_size(args) | {"max_seq_len": max(args.max_seq_len, 2048)}
        config = LMConfig.for_generation("3v", **size, image_ids=image_pad_id(tokenizer),
                                         vision_dim=encoder.hidden_size)
    else:
        config = LMConfig(**model_size(args), image_ids=image_token_ids(tokenizer), vision_dim=encoder.hidden_size,
                          vision_proj_bias=bool(init_sd is not None and has_projection_bias(init_sd)))
    model = MiniMindVLM(config)
    if init is not None:
        report = load_weights(model, init_sd, source=init.path, allow_new_projection=stage.allow_new_projection)
        log.info("loaded %s%s", init.path, f" (new: {', '.join(report.new_keys)})" if report.new_keys else "")
    apply_freeze(model, args.freeze_llm)
    return model


@dataclass
class TrainData:
    dataset: VLMDataset
    sampler: ResumableSampler
    loader_kwargs: dict[str, Any]
    batches_per_epoch: int  # micro-batches

    def row_lengths(self) -> list[int]:
        """Each training row's length in tokens: with the row count, all the samplers know of the data."""
        return [len(s.input_ids) for s in self.dataset.samples]

    def epoch(self, epoch: int, skip_batches: int) -> Iterator[Batch]:
        """This rank's batches of `epoch` (the order is fixed by seed + epoch), starting `skip_batches` in."""
        self.sampler.set_epoch(epoch)
        self.sampler.skip = skip_batches * self.loader_kwargs["batch_size"]
        return iter(DataLoader(self.dataset, **self.loader_kwargs))


def build_data(args: RunConfig, tokenizer, encoder: VisionEncoder, dist: Distributed) -> TrainData:
    """The dataset (with its feature store filled by rank 0 when --feature_cache is set) and its sampler."""
    store = FeatureStore(args.feature_cache, encoder.fingerprint) if args.feature_cache else None
    dataset = VLMDataset(args.data_path, args.images_path, tokenizer, args.max_seq_len,
                         image_prefix=args.image_prefix, multi_turn=args.multi_turn, strict=args.strict_data,
                         preprocess=encoder.preprocess, feature_store=store, skip_text_only=args.skip_text_only,
                         pack_same_image=args.pack_same_image, generation=args.generation)
    packed = sum(s.segment_ids is not None for s in dataset.samples)
    log.info("%s: %d samples%s; %s", args.data_path, len(dataset),
             f" ({packed} of them packed rows of up to {args.pack_same_image} questions on one image)"
             if args.pack_same_image > 1 else "", dataset.skips.summary())
    if len(dataset) == 0:
        raise DataError(f"{args.data_path}: no usable records ({dataset.skips.summary()})")
    if store is not None:
        if dist.is_main:
            n = store.ensure(dataset.image_paths(), encoder, num_workers=min(args.num_workers, 4))
            log.info("feature cache %s: %d images encoded now, %d cached", store.dir, n, len(store))
        dist.barrier()
        store.reload()  # what rank 0 wrote
    if args.group_by_length:
        sampler = LengthGroupedSampler(dataset, [len(s.input_ids) for s in dataset.samples], args.batch_size,
                                       num_replicas=dist.world, rank=dist.rank, seed=args.seed)
    else:
        sampler = ResumableSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=args.seed)
    pad_to = args.max_seq_len if args.pad_to_max else None
    # compiled and packed: every batch has segment ids, so the step's attention layout never changes (one graph)
    segments = args.compile and args.pack_same_image > 1
    loader_kwargs = dict(batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                         collate_fn=lambda items: collate(items, pad_to, segments),
                         pin_memory=dist.device.type == "cuda",
                         drop_last=False, persistent_workers=False)
    return TrainData(dataset, sampler, loader_kwargs, math.ceil(len(sampler) / args.batch_size))


def build_validator(args: RunConfig, tokenizer, encoder: VisionEncoder, dist: Distributed, store,
                    autocast) -> Optional[Validator]:
    """The validation set of --val_data (its images go through the same feature store), or None."""
    if args.save_best and not args.val_data:
        raise DataError("--save_best needs --val_data (the best checkpoint is picked by validation)")
    if not args.val_data:
        return None
    dataset = VLMDataset(args.val_data, args.val_images_path or args.images_path, tokenizer, args.max_seq_len,
                         image_prefix=args.image_prefix, multi_turn=args.multi_turn, strict=False,
                         preprocess=encoder.preprocess, feature_store=store, skip_text_only=args.skip_text_only,
                         generation=args.generation)
    log.info("validation %s: %d samples (%d scored for accuracy); %s", args.val_data, len(dataset),
             min(args.val_samples, len(dataset)), dataset.skips.summary())
    if len(dataset) == 0:
        raise DataError(f"{args.val_data}: no usable validation records ({dataset.skips.summary()})")
    if store is not None:
        if dist.is_main:
            store.ensure(dataset.image_paths(), encoder, num_workers=min(args.num_workers, 4))
        dist.barrier()
        store.reload()
    return Validator(dataset, tokenizer, encoder, dist, args.batch_size, args.val_samples, autocast)


def open_wandb(args: RunConfig, stage: Stage, dist: Distributed):
    if not (args.use_wandb and dist.is_main):
        return None
    import wandb

    return wandb.init(project=args.wandb_project, config=args.as_dict(),
                      name=f"MiniMind-V-{stage.name}-Epoch-{args.epochs}-BatchSize-{args.batch_size}"
                           f"-LearningRate-{args.learning_rate}")
