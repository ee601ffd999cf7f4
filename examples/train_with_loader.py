"""A plain training loop on the engine's loader, through a torch DataLoader.

    python examples/train_with_loader.py --store data/store.zarr --steps 100

The loader's reader workers import this script again when they start, so
everything that makes or uses the loader runs under `if __name__ == "__main__":`.
"""
import argparse


def train(store: str, member: str, steps: int, img_size: int, batch_size: int, workers: int) -> float:
    import segmentation_models_pytorch as smp
    import torch
    from torch.utils.data import DataLoader

    from engine.torch_dataset import LoaderDataset

    model = smp.Unet("timm-mobilenetv3_small_minimal_100", encoder_weights=None, in_channels=3, classes=1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-4)
    loss_of = torch.nn.BCEWithLogitsLoss()
    step, epoch, loss = 0, 0, torch.tensor(float("nan"))
    with LoaderDataset(store, member, batch_size=batch_size, img_size=img_size, workers=workers) as dataset:
        while step < steps:
            for batch in DataLoader(dataset.set_epoch(epoch), batch_size=None):
                loss = loss_of(model(batch["image"]), batch["mask"])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                step += 1
                print(f"epoch {epoch} step {step}: loss {loss.item():.4f}")
                if step == steps:
                    break
            epoch += 1
    return loss.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="data/store.zarr")
    parser.add_argument("--member", default="highres_no_ela", help="a member with RGB input (3 channels)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    train(args.store, args.member, args.steps, args.img_size, args.batch_size, args.workers)
