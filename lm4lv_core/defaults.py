"""Names and defaults shared by the command line and the core, in one place.

Plain values with no imports, so the command line can read them without loading torch."""

# option vocabularies
ENGINES = ("deepspeed", "accelerate")
LAUNCHERS = ("deepspeed", "accelerate", "torchrun")
TOKEN_SELECT = ("first", "strided")  # which of an image's tokens --num-visual-tokens keeps
RESIZE_MODES = ("stretch", "crop")  # how images reach the encoder's square size (see image/io.py)
ATTN_AUTO = "auto"  # what transformers picks for the LLM's family: sdpa where it has it, else eager
ATTN_IMPLEMENTATIONS = (ATTN_AUTO, "sdpa", "eager", "flash_attention_2")  # the LLM's attention
GENERATION_MODES = ("auto", "image", "text")  # generate --mode
OUTPUT_SIZES = ("input", "model")  # generate --output-size: the input image's size, or the model's square
TILE_AUTO = "auto"  # --tile auto: tiles of the vision family's image size

# defaults
CROP_BORDER = 4  # pixels ignored at each border by PSNR/SSIM/LPIPS
GENERATE_BATCH_SIZE = 8
RECON_BATCH_SIZE = 8
DEFAULT_PROMPT = "<image> <task>"
MASTER_PORT = 29500  # where the nodes of a multi-node run meet without --master-port (torch's default)
NODE_TIMEOUT = 600.0  # seconds nodes wait for each other: to start, and before a silent one counts as lost

# file names
RUN_CONFIG = "config.yaml"  # a training run's record, read back by --config / --resume
MODEL_CONFIG = "lm4lv.yaml"  # a saved LM4LV model's config
WEIGHTS_FILE = "trainable.safetensors"  # the trained weights of a saved model and of a checkpoint
JOB_DIR = ".lm4lv"  # hidden folder of the job file, worker errors and stop requests (run and output folders)

# `make-data --size` (defined here so that the CLI can show it without importing make-data)
SIZE_POLICY = "SIZE x SIZE as --resize says; SIZE 0 keeps the original size"
