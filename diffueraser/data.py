"""The training data: the source scan, the loader and the epoch a loader draws from."""
import time

import torch


def scan_data(args, num_processes=1):
    """The data scan's verdict before any model loads (dataset.finetune_dataset.DataScan): a
    missing source, nothing usable or --nframes longer than every video is one line, no traceback."""
    from dataset.finetune_dataset import DataScan

    try:
        scan = DataScan(args)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err))
    if len(scan.entries) < args.train_batch_size * num_processes:
        raise SystemExit(f"the dataset has {len(scan.entries)} clips, fewer than --train_batch_size "
                         f"{args.train_batch_size} x {num_processes} process(es)")
    return scan


def make_dataloader(args, tokenizer, scan=None):
    import cv2

    from dataset.finetune_dataset import FinetuneDataset

    if args.dataloader_num_workers > 0:
        # This process forks the workers: OpenCV's thread pool, once started here (the latent cache's
        # build resizes frames), would be inherited without its threads, and a worker's first OpenCV
        # call would wait for them forever (the first full-size run with the cache hung so).
        cv2.setNumThreads(1)
    dataset = FinetuneDataset(args, tokenizer, scan)
    # Its own generator: starting the loader (every epoch without workers, again on resume) would
    # otherwise draw its workers' base seed from the global RNG, which the training step draws from.
    # The order is the seedable sampler's, each sample a function of (seed, epoch, index).
    generator = None if args.seed is None else torch.Generator().manual_seed(args.seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True, generator=generator,
        num_workers=args.dataloader_num_workers, persistent_workers=args.dataloader_num_workers > 0,
        pin_memory=torch.cuda.is_available())


def start_epoch(dataloader, epoch):
    """Sampler order and per-sample draws of `epoch`. accelerate's set_epoch tells the dataset only
    when one process runs with no batches skipped, so the dataset is told here."""
    dataloader.set_epoch(epoch)
    if hasattr(dataloader.dataset, "set_epoch"):
        dataloader.dataset.set_epoch(epoch)


def use_latent_cache(args, accelerator, dataset, vae, models=()):
    """--latent_cache: the main process encodes the clean frames of videos not yet cached (once;
    progress bar), then every process's loader reads their moments (dataset/latent_cache.py).
    Without room on the cache's disk for them plus 1 GB, plus two checkpoints of `models` (the
    trained ones) where the output folder shares that disk, the run goes without the cache (the
    main process decides for all)."""
    from accelerate.utils import broadcast_object_list

    from dataset.latent_cache import LatentCache, disk_of
    from diffueraser.checkpoints import checkpoint_bytes

    if not args.latent_cache:
        return
    files = [v for v in dataset.entries if v.frames is None]
    if files:  # LATENT_CACHE set for both stages, then a CSV of videos added: train as before, without it
        v = files[0]
        accelerator.print(f"latent cache off: it covers frame folders only, and {len({id(f) for f in files})} "
                          f"videos are files (e.g. {v.source} video {v.name}: {v.path}); extract their frames "
                          "(--frames_root) to use it, or leave LATENT_CACHE empty")
        return
    cache = LatentCache(args.latent_cache, args.resolution, vae).attach(dataset.entries)
    room = True
    if accelerator.is_main_process:  # a full disk must not end the run, nor starve its checkpoints
        need, free, disk = cache.room(dataset.entries)
        keep = 2**30 + (2 * checkpoint_bytes(models) if disk_of(args.output_dir)[1] == disk else 0)
        room = not need or need + keep <= free
        if not room:
            accelerator.print(f"latent cache off: the clean frames' moments need {need / 1e9:.1f} GB more in "
                              f"{cache.dir}, {free / 1e9:.1f} GB is free there and {keep / 1e9:.1f} GB stays free "
                              "(1 GB, and two checkpoints where they share the disk); point LATENT_CACHE at a disk "
                              "with room, or leave it empty")
    if not broadcast_object_list([room])[0]:  # every process goes as the main one decided
        for v in dataset.entries:
            v.latents = None
        return
    if accelerator.is_main_process:
        start, (count, bad) = time.time(), cache.build(dataset.entries, vae, accelerator.is_local_main_process)
        for line in bad:
            accelerator.print(f"latent cache: not cached, its clips will be skipped: {line}")
        accelerator.print(f"latent cache {cache.dir}: {count} videos encoded in {time.time() - start:.0f} s, "
                          f"{len(set(v.latents for v in dataset.entries)) - count - len(bad)} read")
    accelerator.wait_for_everyone()
    missing = LatentCache.missing(dataset.entries)  # every process: is the cache folder shared with it?
    if len(missing) == len({v.latents for v in dataset.entries}):  # another node, the folder not shared with it
        print(f"latent cache: no cached moments in {cache.dir} on process {accelerator.process_index}: it encodes "
              "its clean frames every step, as without the cache (more time and GPU memory than the others; give "
              "every node a --latent_cache folder on a shared disk)")
        for v in dataset.entries:
            v.latents = None
        return
    if missing and not accelerator.is_main_process:
        print(f"latent cache: {len(missing)} videos have no cached moments on process {accelerator.process_index}; "
              "their clips are skipped")
