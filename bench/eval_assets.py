"""What `gpu_session.sh eval`/`smoke` evaluate with, written without downloads: synthetic videos, a
rule-filled I3D (VFID) and a random AlexNet (LPIPS), and with --weights a random stage-2 weight set
in the released layout (unet_main/ motion UNet + brushnet/) beside a random base model. The scores
mean nothing; the time each part takes is the point (the scores run beside the sampling).

    python bench/eval_assets.py OUT --frames 67 --size 480x854 [--weights full|tiny]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--frames", type=int, default=67, help="Frames per video (DAVIS val's mean: 67).")
    parser.add_argument("--size", default="480x854", help="HxW of the frames.")
    parser.add_argument("--weights", choices=["full", "tiny"], help="Also write base/ and stage2/ of this size.")
    args = parser.parse_args()
    import torch
    import torchvision

    from diffueraser.metrics import InceptionI3d, fill_i3d_by_rule
    from diffueraser.tiny import write_synthetic_davis, write_tiny_motion_adapter, write_tiny_sd

    h, w = (int(x) for x in args.size.split("x"))
    write_synthetic_davis(os.path.join(args.out, "videos"), videos=("v0", "v1"), nframes=args.frames, size=(h, w))
    torch.save(fill_i3d_by_rule(InceptionI3d()).state_dict(), os.path.join(args.out, "i3d.pt"))
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), os.path.join(args.out, "alexnet.pth"))
    if args.weights:
        from libs.brushnet_CA import BrushNetModel
        from libs.unet_2d_condition import UNet2DConditionModel
        from libs.unet_motion_model import MotionAdapter, UNetMotionModel

        size = "micro" if args.weights == "tiny" else "full"
        base = write_tiny_sd(os.path.join(args.out, "base"), size=size)
        adapter = write_tiny_motion_adapter(os.path.join(args.out, "adapter"), size=size)
        unet = UNet2DConditionModel.from_pretrained(os.path.join(base, "unet"))
        BrushNetModel.from_unet(unet).save_pretrained(os.path.join(args.out, "stage2", "brushnet"))
        motion = UNetMotionModel.from_unet2d(unet, MotionAdapter.from_pretrained(adapter))
        motion.save_pretrained(os.path.join(args.out, "stage2", "unet_main"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
