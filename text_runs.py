"""
What a text-to-image run adds to training (U-ViT §4.4, MS-COCO; train_t2i_discrete.py @ baofff/U-ViT ce55170): the
labels are caption rows, one caption drawn per image per step (captions.CaptionLabels), and the CLIP context of each
is encoded on the fly by the frozen text tower of --clip (clip.TextContext): caption texts are stored, not features
(BENCHMARKS.md, "Caption storage"). The empty prompt's context is the unconditional input (model.null_context) that
context dropout and guidance use. Grids and FID are conditioned on held-out captions.
"""
from captions import CaptionLabels, flat_captions, load_caption_dataset
from clip import FrozenCLIPEmbedder, TextContext
from errors import RunError


class Captioned(CaptionLabels):
    """The training labels of a caption dataset, with its texts: captions (a list per image) and held (prompts)."""

    def __init__(self, captions, held):
        super().__init__([len(c) for c in captions])
        self.captions, self.held = captions, held


def load_text_data(args):
    """(images or a LatentFolder, Captioned labels, no class names) of --dataset captions / cifar10-captions."""
    if not args.clip:
        raise RunError(f"--dataset {args.dataset} needs --clip DIR, the CLIP text tower the captions are encoded by "
                       "(openai/clip-vit-large-patch14, or clip.write_small_clip's for the CPU demo)")
    x, per_image, held = load_caption_dataset(args.dataset, args.data_dir, args.image_size, args.captions,
                                              args.cifar_url)
    print(f"captions: {len(per_image):,} images, {sum(map(len, per_image)):,} captions, {len(held):,} held-out "
          "prompts (for grids and FID)")
    return x, Captioned(per_image, held), []


class TextRun:
    """The run's CLIP encoder and what it conditions: training labels (caption rows) and prompt lists."""

    def __init__(self, clip_dir, labels, device):
        self.encoder = FrozenCLIPEmbedder(clip_dir, device)
        self.train = TextContext(self.encoder, flat_captions(labels.captions))  # label = caption row
        self.held = labels.held
        self.model_kwargs = {"clip_dim": self.encoder.width, "num_clip_token": self.encoder.tokenizer.context_length}
        self.config = {"text": {"clip": self.encoder.folder, "prompts": self.held[:10]}}  # checkpoints record it

    def wrap(self, fwd, model):
        """The training forward: caption rows -> contexts; the empty prompt's context becomes the model's
        unconditional input (dropped samples). Grids and FID give the empty prompt as a label instead (prompts)."""
        model.null_context.copy_(self.encoder.encode([""])[0])
        return self.train.wrap(fwd)

    def prompts(self, fwd, prompts):
        """fwd with labels 0..P-1 meaning these prompts and P the empty one (guidance's null label)."""
        return TextContext(self.encoder, prompts).wrap(fwd)
