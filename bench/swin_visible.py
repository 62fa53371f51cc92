"""LocalMIM on Swin: the training step with the visible tokens alone (localmim.py: swin.window_groups, GreenMIM's
gathering) against the dense visible-only encoder it replaced (every token computed, masked keys hidden), which
gives the visible tokens the same outputs (tests/test_swin.py). Swin-B at 224 px, 75 % masking, HOG targets.

    python bench/swin_visible.py --threads 1 --batch-size 2          # CPU, fp32: ms per step and the ratio

Each round times both paths on the same weights, images and mask (forward, backward, AdamW), alternating;
the best of the rounds is reported, per second of process CPU time.
"""
import argparse
import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, not bench/
import torch  # noqa: E402

import localmim  # noqa: E402
import swin  # noqa: E402


def dense_encode(self, img, mask):
    """The dense visible-only Swin encoder (localmim.py before the visible-token path), latents as the decoders
    now take them: (visible tokens, their raster positions) of each scale."""
    enc, latents = self.encoder, []
    x = enc.embed(img)
    visible = localmim.mask_to_scale(mask, enc.grid[0]).view(img.shape[0], *enc.grid) == 0
    for s, stage in enumerate(enc.layers):
        if s > 0:
            x, visible = stage.downsample(x), swin.merge_visible(visible)
            self.tap(x, latents)
        for blk in stage.blocks:
            x = blk(x, visible)
    self.tap(x, latents)
    out = []
    for z in latents:  # the same (tokens, where) pairs as the visible-token path
        g = z.shape[1]
        where = torch.where(localmim.mask_to_scale(mask[:1], g)[0] == 0)[0]
        out.append((z.flatten(1, 2)[:, where], where))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per path and round")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--model", default="swin_base_patch4_window7_224")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = localmim.LocalMIM(swin.create_model(args.model, num_classes=0, norm_eps=1e-6), nbins=18, hog_bias=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # as localmim.py
    img = torch.randn(args.batch_size, 3, 224, 224)
    mask = model.random_mask(args.batch_size, "cpu")
    paths = {"dense": lambda *a: dense_encode(model, *a), "visible tokens": model.encode}
    with torch.no_grad():
        ref, new = paths["dense"](img, mask), paths["visible tokens"](img, mask)
    err = max((a - b).abs().max().item() for (a, _), (b, _) in zip(ref, new))
    best = {}
    for _ in range(args.rounds):
        for name, encode in paths.items():
            model.encode = encode
            model(img, mask)[0].backward()  # warm-up
            opt.zero_grad()
            t0 = time.process_time()
            for _ in range(args.steps):
                model(img, mask)[0].backward()
                opt.step()
                opt.zero_grad()
            best[name] = min(best.get(name, 1e9), (time.process_time() - t0) / args.steps)
    visible = int((mask[0] == 0).sum())
    print(f"{args.model}, 224 px, batch {args.batch_size}, fp32, {torch.get_num_threads()} thread(s), torch "
          f"{torch.__version__}; {visible} of {mask[0].numel()} mask units of 32 px visible; latents agree to "
          f"{err:.1e}")
    for name, t in best.items():
        print(f"{name:<15} {1000 * t:8.0f} ms per step (process CPU time, best of {args.rounds})")
    print(f"speed-up {best['dense'] / best['visible tokens']:.2f}x")


if __name__ == "__main__":
    main()
