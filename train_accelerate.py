"""Train the CLIP-LSTM captioner with Accelerate.

    accelerate launch train_accelerate.py --dataset jxie/flickr8k --output_dir outputs/flickr8k
    python train_accelerate.py --demo        # offline: the built-in shapes set, a few minutes on CPU

Reads top to bottom like the steps of training: arguments, accelerator, data, tokenizer and
model, cached CLIP embeddings, optimizer and schedule, prepare, resume, the loop (validation
loss, sample captions, early stopping, the best model saved atomically), and the end
(evaluation, push to the Hub).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, get_scheduler

from clip_lstm_captioner.cli import (
    DEMO_OUTPUT_DIR,
    MODEL_FOLDER,
    dropout_rate,
    fraction,
    loading,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
    steps_or_epoch,
)
from clip_lstm_captioner.data import add_data_args, dataset_from_args
from clip_lstm_captioner.embedding_cache import cache_image_embeds, image_embeds_of, weights_digest
from clip_lstm_captioner.errors import TrainingError, UsageError
from clip_lstm_captioner.files import default_cache_dir, write_text_atomic
from clip_lstm_captioner.pretraining import pretrained_tower_folder
from clip_lstm_captioner.publishing import publish
from clip_lstm_captioner.run_folder import (
    TRACKER_PROJECT,
    check_output_dir,
    clear_previous_run,
    find_checkpoint,
    load_checkpoint,
    output_dir_lock,
    recover_interrupted_save,
    save_best_model,
    save_checkpoint,
)
from clip_lstm_captioner.shapes import read_scenes, shapes_root
from configuration_clip_lstm import IMAGE_FEATURES, ClipLstmConfig
from evaluate_model import evaluate_captioner
from modeling_clip_lstm import DEFAULT_VISION_MODEL, ClipLstmForImageCaptioning
from processing import (
    ClipLstmProcessor,
    build_caption_tokenizer,
    image_processor_for,
    load_clip_tokenizer,
)

# The demo's CLIP tower: small patches on the 96 px shapes images. `--vision_model pretrain` (the
# demo's) trains it contrastively on the training split first (clip_lstm_captioner/pretraining.py);
# a random tower keeps colour but not shape (see the README for both sets of scores).
# fmt: off
DEMO_VISION_CONFIG = dict(
    image_size=96, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, projection_dim=128,
)
DEMO_DEFAULTS = dict(
    dataset="shapes", vision_model="pretrain", output_dir=str(DEMO_OUTPUT_DIR), min_word_frequency=1,
    image_feature="patches", embed_dim=128, hidden_size=256, batch_size=64, learning_rate=3e-3, num_epochs=8,
    patience=3,
)


def parse_args(argv=None) -> argparse.Namespace:
    # Left as written (fmt: off above): the formatter would spread each flag over five lines.
    parser = argparse.ArgumentParser(prog="train_accelerate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true",
                        help="The offline demo: shapes set, a small CLIP tower pre-trained here, a small "
                        f"attention decoder over its patch tokens, output in {DEMO_OUTPUT_DIR}; explicit flags "
                        "still win (--image_feature pooled for the pooled decoder).")
    add_data_args(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--vision_model", default=DEFAULT_VISION_MODEL,
                       help="CLIP checkpoint (Hub id or folder) for the frozen vision tower; 'random' for a "
                       "randomly initialised tower shaped by --vision_config; or 'pretrain' to train such a "
                       "tower contrastively on the training split first (the offline demo's choice).")
    model.add_argument("--vision_config", default=None,
                       help="With --vision_model random or pretrain: a CLIPVisionConfig as JSON text or a "
                       "config.json path (default: the demo's small tower).")
    model.add_argument("--pretrain_steps", type=positive_int, default=400,
                       help="With --vision_model pretrain: contrastive steps (batch 128); the result is cached.")
    model.add_argument("--image_feature", choices=IMAGE_FEATURES, default="pooled",
                       help="CLIP feature fed to the decoder: pooled CLS token, projected embedding, or "
                       "patches: the tower's final tokens, attended over at every step (cached in float16).")
    model.add_argument("--attention_heads", type=positive_int, default=16,
                       help="Heads of the attention over the tokens with --image_feature patches (default 16; "
                       "must divide --embed_dim and 256, the attention width).")
    model.add_argument("--layout_dim", type=non_negative_int, default=16,
                       help="With --image_feature patches: numbers kept per token for the layout summary that "
                       "the output layer reads beside the attention (default 16; 0 leaves it out).")
    model.add_argument("--no_normalize_image_embeds", action="store_true",
                       help="Feed the CLIP feature unnormalised (default: L2-normalised inside the model).")
    model.add_argument("--tokenizer", default="captions",
                       help="'captions' builds a word-level tokenizer from the training captions; or a CLIP "
                       "tokenizer's Hub id or folder (BPE, 49,409 tokens with its pad token).")
    model.add_argument("--min_word_frequency", type=positive_int, default=5,
                       help="With --tokenizer captions: words seen fewer times become <unk>.")
    model.add_argument("--max_caption_length", type=positive_int, default=64, help="Captions are cut to this many tokens.")
    model.add_argument("--embed_dim", type=positive_int, default=512, help="Token embedding width.")
    model.add_argument("--hidden_size", type=positive_int, default=512, help="LSTM hidden size.")
    model.add_argument("--num_layers", type=positive_int, default=1, help="Stacked LSTM layers.")
    model.add_argument("--dropout", type=dropout_rate, default=0.2, help="Dropout on LSTM inputs, between layers, before the head.")
    train = parser.add_argument_group("training")
    train.add_argument("--batch_size", type=positive_int, default=256, help="Captions per batch and process.")
    train.add_argument("--learning_rate", type=positive_float, default=1e-3, help="Peak AdamW learning rate.")
    train.add_argument("--num_epochs", type=positive_int, default=30, help="Maximum number of epochs.")
    train.add_argument("--max_train_steps", type=positive_int, default=None,
                       help="Stop after this many optimizer steps (overrides --num_epochs; for tests and smoke runs).")
    train.add_argument("--lr_scheduler", default="cosine",
                       choices=("linear", "cosine", "constant", "constant_with_warmup"), help="Learning-rate schedule.")
    train.add_argument("--warmup_ratio", type=fraction, default=0.03, help="Fraction of steps spent warming up.")
    train.add_argument("--weight_decay", type=non_negative_float, default=0.0, help="AdamW weight decay.")
    train.add_argument("--max_grad_norm", type=non_negative_float, default=1.0, help="Gradient clipping norm (0 disables).")
    train.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, help="Batches per optimizer step.")
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="Mixed precision (default: what `accelerate launch` says, else no).")
    train.add_argument("--seed", type=int, default=42, help="Seed for weights, shuffling and dropout.")
    train.add_argument("--patience", type=positive_int, default=5,
                       help="Stop after this many epochs without a better validation loss.")
    train.add_argument("--embed_batch_size", type=positive_int, default=256, help="Images per CLIP batch when caching.")
    train.add_argument("--num_workers", type=non_negative_int, default=None,
                       help="Image-decoding workers per process when caching (default: CPU cores / processes, up to 8).")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", default="outputs/run",
                     help="Run folder: model/, checkpoints/, loss curve, logs. One run per folder: a folder "
                     "that already holds files is refused unless you resume or pass --overwrite_output_dir.")
    out.add_argument("--overwrite_output_dir", action="store_true",
                     help="Train into an output_dir that holds an earlier run: that run's files (model/, "
                     "checkpoints/, eval/, samples.jsonl, trainer_state.json, loss_curve.png, tracker logs) are "
                     "deleted first; other files are left alone.")
    out.add_argument("--checkpointing_steps", type=steps_or_epoch, default=None,
                     help="Save the training state every N optimizer steps, or 'epoch'.")
    out.add_argument("--checkpoints_total_limit", type=positive_int, default=2, help="Keep this many newest checkpoints.")
    out.add_argument("--resume_from_checkpoint", default=None,
                     help="A checkpoint folder, or 'latest' for the newest in output_dir/checkpoints.")
    out.add_argument("--report_to", choices=("none", "tensorboard", "trackio", "all"), default="none",
                     help="Experiment tracker for losses and learning rate.")
    out.add_argument("--num_sample_images", type=non_negative_int, default=4,
                     help="Validation images captioned after each epoch so you can watch the model learn.")
    out.add_argument("--num_beams", type=positive_int, default=5, help="Beam width of the saved generation config.")
    out.add_argument("--max_new_tokens", type=positive_int, default=30, help="Caption length limit of the saved generation config.")
    out.add_argument("--no_eval", action="store_true",
                     help="Skip the final test-split evaluation (metrics, report, gallery) of the best model.")
    out.add_argument("--no_meteor", action="store_true", help="Leave METEOR (a Java process) out of the final evaluation.")
    out.add_argument("--push_to_hub", action="store_true", help="Publish the best model to the Hub at the end.")
    out.add_argument("--hub_model_id", default=None, help="Hub repo for --push_to_hub (default: the output folder name).")
    # fmt: on
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--demo" in argv:
        parser.set_defaults(**DEMO_DEFAULTS)
    args = parser.parse_args(argv)
    if args.demo and args.output_dir == str(DEMO_OUTPUT_DIR) and not args.resume_from_checkpoint:
        args.overwrite_output_dir = True  # the demo's own folder: running the demo again redoes it
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint would read; "
                     "pass one of them")
    if args.image_feature == "patches" and (args.embed_dim % args.attention_heads or 256 % args.attention_heads):
        parser.error(f"--attention_heads {args.attention_heads} must divide --embed_dim ({args.embed_dim}) "
                     "and 256 (the attention width)")
    return args


# ----------------------------------------------------------------------------- building blocks


def check_trackers(report_to: str) -> list[str] | None:
    """The trackers to log to; accelerate only warns when a tracker's package is missing, we stop."""
    if report_to == "none":
        return None
    names = ["tensorboard", "trackio"] if report_to == "all" else [report_to]
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"--report_to {report_to}: the {name} package is not installed "
                             "(pip install -e '.[tracking]')")
    return names


def build_tokenizer(args, train_split):
    if args.tokenizer == "captions":
        captions = [caption for captions in train_split["captions"] for caption in captions]
        return build_caption_tokenizer(captions, args.min_word_frequency, args.max_caption_length)
    with loading(f"--tokenizer {args.tokenizer}"):
        return load_clip_tokenizer(args.tokenizer, args.max_caption_length)


def vision_source(args, train_split, tokenizer) -> str:
    """Where the CLIP tower comes from: a checkpoint, 'random', or a tower pre-trained here (cached)."""
    if args.vision_model != "pretrain":
        return args.vision_model
    folder = pretrained_tower_folder(train_split, tokenizer, random_vision_config(args),
                                     cache_dir=args.data_cache_dir or default_cache_dir(), steps=args.pretrain_steps,
                                     seed=args.seed)
    return str(folder)


def build_model(args, tokenizer, vision_model: str) -> ClipLstmForImageCaptioning:
    """The captioner around the chosen CLIP tower, with the decoder sized by the flags."""
    decoder = dict(
        image_feature=args.image_feature, attention_heads=args.attention_heads,
        layout_dim=args.layout_dim if args.image_feature == "patches" else 0,
        normalize_image_embeds=not args.no_normalize_image_embeds,
        embed_dim=args.embed_dim, hidden_size=args.hidden_size, num_layers=args.num_layers, dropout=args.dropout,
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if vision_model != "random":
        with loading(f"--vision_model {vision_model}"):
            model = ClipLstmForImageCaptioning.from_clip(vision_model, **decoder)
    else:
        model = ClipLstmForImageCaptioning(ClipLstmConfig(vision_config=random_vision_config(args), **decoder))
    generation = model.generation_config
    generation.num_beams, generation.max_new_tokens = args.num_beams, args.max_new_tokens
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        generation.suppress_tokens = [tokenizer.unk_token_id]  # never write "<unk>" into a caption
    return model


def random_vision_config(args) -> CLIPVisionConfig:
    if args.vision_config is None:
        return CLIPVisionConfig(**DEMO_VISION_CONFIG)
    text = Path(args.vision_config).read_text() if Path(args.vision_config).is_file() else args.vision_config
    try:
        return CLIPVisionConfig(**json.loads(text))
    except (json.JSONDecodeError, TypeError) as error:
        raise UsageError(f"--vision_config: not a CLIPVisionConfig JSON object or file ({error})") from None


class CaptionPairs(torch.utils.data.Dataset):
    """Every reference caption of every image, as training items (image features, caption tokens).

    Captions are kept in one padded (N, L) int32 tensor, and a batch is cut with a few tensor ops
    (`__getitems__`, which DataLoader calls with a batch's indices) and trimmed to its longest
    caption: no per-item Python padding, which would dominate a 10 ms GPU step. `image_embeds`
    stays where `image_embeds_of` put it (the memory-mapped cache file): a batch copies its rows.

    >>> pairs = CaptionPairs(torch.zeros(2, 4), [0, 0, 1], [[1, 5, 2], [1, 2], [1, 6, 7, 2]], pad_token_id=0)
    >>> batch = pairs.__getitems__([0, 1])
    >>> batch["input_ids"].tolist(), batch["labels"].tolist()
    ([[1, 5, 2], [1, 2, 0]], [[1, 5, 2], [1, 2, -100]])
    """

    def __init__(self, image_embeds: torch.Tensor, image_index: torch.Tensor, token_ids: list[list[int]], pad_token_id: int):
        self.image_embeds, self.image_index = image_embeds, torch.as_tensor(image_index, dtype=torch.long)
        self.lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)
        longest = int(self.lengths.max()) if len(token_ids) else 1
        self.tokens = torch.full((len(token_ids), longest), pad_token_id, dtype=torch.int32)
        for row, ids in enumerate(token_ids):
            self.tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.int32)

    @classmethod
    def from_split(cls, split: datasets.Dataset, tokenizer, max_length: int = 64, chunk: int = 4096) -> CaptionPairs:
        """Tokenise all captions of a split that has an `image_embeds` column.

        `chunk` images at a time: the tokenizer's Python lists for a whole COCO split would take
        several times the memory of the tensors kept.
        """
        pad, parts = tokenizer.pad_token_id, []
        for start in range(0, split.num_rows, chunk):
            rows = split.select_columns(["captions"])[start : start + chunk]["captions"]
            image_index = [start + i for i, captions in enumerate(rows) for _ in captions]
            captions = [caption for captions in rows for caption in captions]
            token_ids = tokenizer(captions, truncation=True, max_length=max_length)["input_ids"] if captions else []
            parts.append(cls(None, image_index, token_ids, pad))
        pairs = cls(image_embeds_of(split), [], [], pad)
        if parts:
            width = max(part.tokens.shape[1] for part in parts)
            pairs.image_index = torch.cat([part.image_index for part in parts])
            pairs.lengths = torch.cat([part.lengths for part in parts])
            pairs.tokens = torch.cat([torch.nn.functional.pad(part.tokens, (0, width - part.tokens.shape[1]), value=pad)
                                      for part in parts])  # fmt: skip
        return pairs

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A batch padded to its longest caption: `image_embeds`, `input_ids`, `attention_mask`, `labels` (-100 at padding)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        lengths = self.lengths[indices]
        input_ids = self.tokens[indices, : int(lengths.max())].long()
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        return {
            "image_embeds": self.image_embeds[self.image_index[indices]],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[0] for name, value in self.__getitems__([index]).items()}


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataLoader collate_fn for `CaptionPairs`: `__getitems__` already built the batch."""
    return batch


def caption_loader(pairs: CaptionPairs, batch_size: int, shuffle: bool, seed: int = 0):
    # Its own generator: starting an epoch must not draw from the global RNG that dropout uses,
    # or a resumed run (which starts its first epoch at a different point) would drift.
    return torch.utils.data.DataLoader(
        pairs, batch_size=batch_size, shuffle=shuffle, collate_fn=keep_batch, generator=torch.Generator().manual_seed(seed)
    )


def training_step(model, batch, accelerator, optimizer, scheduler, max_grad_norm: float) -> torch.Tensor:
    """Forward (scoring target positions only), backward, clip, step; returns the loss, detached.

    No host sync here: the loss stays on the device and is summed there until the epoch ends.
    """
    with accelerator.accumulate(model):
        loss = model(**batch, return_logits=False).loss
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return loss.detach().float()


@torch.no_grad()
def validation_loss(model, loader, accelerator) -> float:
    """Mean token loss over the whole validation set (every process sees all of it: no sharding skew)."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), 0
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss = model(**batch, return_logits=False).loss
        targets = int((batch["labels"][:, 1:] != -100).sum())
        total += loss.float() * targets
        count += targets
    model.train()
    return float(total) / max(count, 1)


@torch.no_grad()
def sample_captions(model, processor, split, count: int) -> list[dict]:
    """Caption the first `count` validation images with the model's generation config."""
    rows = split.select(range(min(count, split.num_rows)))
    ids = model.generate(image_embeds=image_embeds_of(rows).to(model.device))
    return [
        {"image_id": image_id, "caption": caption, "reference": refs[0]}
        for image_id, caption, refs in zip(rows["image_id"], processor.batch_decode(ids), rows["captions"], strict=True)
    ]


def plot_losses(history: list[dict], path: Path) -> None:
    """Train and validation loss per epoch, rewritten after every epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    axis.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    axis.set(xlabel="epoch", ylabel="cross-entropy per token", title="Caption loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def check_finite(state: dict, name: str, loss: float) -> None:
    """Stop on a NaN/inf loss before anything is saved: a diverged model must not become 'the best'."""
    if not math.isfinite(loss):
        raise TrainingError(f"epoch {state['epoch'] + 1}, step {state['step']}: the {name} loss is {loss}; stopped "
                            "without saving (try a lower --learning_rate, or check the data)")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    """Train from the command line (a user error: one line on stderr, exit status 2); returns the loop state."""
    return run_cli(train, "train_accelerate.py", parse_args(argv))


def train(args: argparse.Namespace) -> dict:
    """Set up the accelerator, take the output folder for this run (locked), then `run_training`."""
    output_dir = Path(args.output_dir)
    trackers = check_trackers(args.report_to)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:  # the one process that writes run files owns the folder
            stack.enter_context(output_dir_lock(output_dir))
        check_output_dir(args, output_dir)
        if accelerator.is_main_process:
            clear_previous_run(args, output_dir)
            recover_interrupted_save(output_dir / MODEL_FOLDER)
        accelerator.wait_for_everyone()
        checkpoint = find_checkpoint(args)  # before any work: a broken one is named at once
        return run_training(args, accelerator, trackers, checkpoint)


def run_training(args, accelerator, trackers: list[str] | None, checkpoint: Path | None) -> dict:
    """The steps of training, in order: data, model, cache, optimizer, prepare, resume, loop, finish."""
    output_dir = Path(args.output_dir)
    set_seed(args.seed)
    accelerator.print(f"processes: {accelerator.num_processes}, device: {accelerator.device}")

    # Data, tokenizer, model; the CLIP embeddings are computed once, each process encoding its share.
    with accelerator.main_process_first():
        splits = dataset_from_args(args)
    tokenizer = build_tokenizer(args, splits["train"])
    with accelerator.main_process_first():
        tower = vision_source(args, splits["train"], tokenizer)
    set_seed(args.seed)  # the decoder's initial weights must not depend on whether the tower was cached
    model = build_model(args, tokenizer, tower)
    processor = ClipLstmProcessor(image_processor_for(model.config.vision_config), tokenizer, args.max_caption_length)
    model.to(accelerator.device)
    encoder = weights_digest(model.vision_tower)  # hashed once for the three splits
    splits = {
        name: cache_image_embeds(split, model, processor.image_processor, cache_dir=args.data_cache_dir,
                                 batch_size=args.embed_batch_size, num_workers=args.num_workers,
                                 on_bad_image=args.on_bad_image, encoder_digest=encoder, accelerator=accelerator)
        for name, split in splits.items()
    }
    model.fit_image_statistics(image_embeds_of(splits["train"]))
    train_pairs = CaptionPairs.from_split(splits["train"], tokenizer, args.max_caption_length)
    val_pairs = CaptionPairs.from_split(splits["validation"], tokenizer, args.max_caption_length)
    train_loader = caption_loader(train_pairs, args.batch_size, shuffle=True, seed=args.seed)
    val_loader = caption_loader(val_pairs, args.batch_size, shuffle=False)
    accelerator.print(f"{len(train_pairs)} training captions of {splits['train'].num_rows} images, "
                      f"{len(val_pairs)} validation captions, vocabulary {len(tokenizer)}")

    # Optimizer over the decoder only (the CLIP tower is frozen), warmup then the chosen schedule.
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=int(args.warmup_ratio * max_steps),
                              num_training_steps=max_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    if trackers:
        accelerator.init_trackers(TRACKER_PROJECT, config={k: v for k, v in vars(args).items() if v is not None})

    # Re-seed so that dropout does not depend on whether the embedding cache was hit or computed
    # (its DataLoader draws from the global RNG): a resumed run then matches an uninterrupted one.
    set_seed(args.seed)
    # Resume: weights, optimizer, schedule and RNG states, then skip the batches already seen.
    state = dict(step=0, epoch=0, batches_done=0, epoch_loss_sum=0.0, history=[], best_val_loss=None, bad_epochs=0)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)  # this run's counters, best_val_loss included
        accelerator.print(f"resumed from {checkpoint} at step {state['step']} (epoch {state['epoch']})")

    # What the Accelerator used (the flag, else `accelerate launch --mixed_precision` or `accelerate config`).
    run_args = {**vars(args), "mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes}
    # a `with`: the bar is closed on an error too, so the one-line error gets a line of its own
    with tqdm(total=max_steps, initial=state["step"], desc="training", disable=not accelerator.is_local_main_process) as progress:
        model.train()
        while state["step"] < max_steps and state["epoch"] < args.num_epochs:
            train_loader.set_epoch(state["epoch"])
            batches = accelerator.skip_first_batches(train_loader, state["batches_done"]) if state["batches_done"] else train_loader
            running_loss = torch.tensor(state["epoch_loss_sum"], device=accelerator.device)  # resumed mid-epoch: not 0
            for batch in batches:
                running_loss += training_step(model, batch, accelerator, optimizer, scheduler, args.max_grad_norm)
                state["batches_done"] += 1
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                progress.update(1)
                if args.checkpointing_steps not in (None, "epoch") and state["step"] % int(args.checkpointing_steps) == 0:
                    state["epoch_loss_sum"] = float(accelerator.reduce(running_loss, "mean"))
                    check_finite(state, "training", state["epoch_loss_sum"])
                    save_checkpoint(accelerator, args, state)
                if state["step"] >= max_steps:
                    break
            if state["step"] >= max_steps and state["batches_done"] < len(train_loader):
                break  # stopped mid-epoch by --max_train_steps: an interrupted run, resumable from its checkpoint
            # End of an epoch: validation loss, sample captions, best model, early stopping.
            train_loss = float(accelerator.reduce(running_loss, "mean")) / state["batches_done"]
            val_loss = validation_loss(model, val_loader, accelerator)
            check_finite(state, "training", train_loss)
            check_finite(state, "validation", val_loss)
            state["history"].append(dict(epoch=state["epoch"] + 1, step=state["step"], train_loss=train_loss, val_loss=val_loss))
            accelerator.log({"train_loss": train_loss, "val_loss": val_loss, "lr": scheduler.get_last_lr()[0]}, step=state["step"])
            improved = state["best_val_loss"] is None or val_loss < state["best_val_loss"]
            state["best_val_loss"] = val_loss if improved else state["best_val_loss"]
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            state["epoch"] += 1
            state["batches_done"], state["epoch_loss_sum"] = 0, 0.0
            if accelerator.is_main_process:
                samples = sample_captions(unwrapped, processor, splits["validation"], args.num_sample_images)
                report_epoch(state, samples, output_dir, improved)
                if improved:
                    save_best_model(unwrapped, processor, output_dir / MODEL_FOLDER, run_args)
            accelerator.wait_for_everyone()
            if args.checkpointing_steps == "epoch":
                save_checkpoint(accelerator, args, state)
            if state["bad_epochs"] >= args.patience:
                accelerator.print(f"early stopping: no better validation loss for {args.patience} epochs")
                break
    accelerator.end_training()
    if accelerator.is_main_process and state["history"]:
        summary = dict(state, num_processes=accelerator.num_processes, model_dir=str(output_dir / MODEL_FOLDER))
        write_text_atomic(output_dir / "trainer_state.json", json.dumps(summary, indent=2))
        finish(args, splits, accelerator.device)
    return state


def finish(args, splits: dict, device) -> None:
    """Evaluate the best model on the test split, say where everything is, publish if asked."""
    output_dir = Path(args.output_dir)
    model_dir = output_dir / MODEL_FOLDER
    report = None
    if not args.no_eval:
        model = ClipLstmForImageCaptioning.from_pretrained(model_dir).to(device).eval()
        processor = ClipLstmProcessor.from_pretrained(model_dir)
        scenes = read_scenes(shapes_root(args.data_cache_dir)) if args.dataset == "shapes" else None
        report = evaluate_captioner(
            model, processor, splits["test"], output_dir=output_dir / "eval", dataset_name=args.dataset,
            model_name=str(model_dir), train_captions=splits["train"]["captions"], meteor=not args.no_meteor,
            shapes_scenes=scenes,
        )
        # next to the weights, so the model card (publishing.py) shows the results
        write_text_atomic(model_dir / "report.json", json.dumps(report, indent=2))
        print((output_dir / "eval" / "report.md").read_text())
    print(f"model: {model_dir}\nloss curve: {output_dir / 'loss_curve.png'}\n"
          f"sample captions per epoch: {output_dir / 'samples.jsonl'}")
    if report is not None:
        print(f"test-split report and gallery: {output_dir / 'eval'} (report.md, captions.jsonl, gallery.html)")
    if args.push_to_hub:
        commit = publish(model_dir, args.hub_model_id or output_dir.name)  # reads report.json, training_args.json
        print(f"published: {commit}")


def report_epoch(state: dict, samples: list[dict], output_dir: Path, improved: bool) -> None:
    """Print the epoch's losses and sample captions; append them to samples.jsonl; redraw the loss curve."""
    last = state["history"][-1]
    marker = " (best so far, saved)" if improved else ""
    tqdm.write(f"epoch {last['epoch']}: train loss {last['train_loss']:.3f}, validation loss {last['val_loss']:.3f}{marker}")
    for sample in samples:
        tqdm.write(f"  {sample['image_id']}: {sample['caption']!r}  (reference: {sample['reference']!r})")
    with open(output_dir / "samples.jsonl", "a") as file:
        file.write(json.dumps({"epoch": last["epoch"], "samples": samples}) + "\n")
    plot_losses(state["history"], output_dir / "loss_curve.png")


if __name__ == "__main__":
    main()
