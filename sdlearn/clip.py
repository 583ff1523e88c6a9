"""CLIP as the lessons use it: the tokenizer, the text model and TinyCLIP under their public
name `sdlearn.clip` (the code is in `sdlearn/models/clip.py`), and the recipes that train our
own vocabulary and TinyCLIP (`sdlearn/recipes/clip.py`).
"""

from sdlearn.models.clip import (  # noqa: F401 (re-exported)
    ACTIVATIONS,
    BOS_TOKEN,
    CONTEXT_LENGTH,
    END_OF_WORD,
    EOS_TOKEN,
    LOGIT_SCALE_INIT,
    LOGIT_SCALE_MAX,
    PIECE_PATTERN,
    PIECE_PATTERN_OPENAI,
    TEXT_CLEANINGS,
    CLIPAttention,
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPMLP,
    CLIPTextConfig,
    CLIPTextEmbeddings,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTextTransformer,
    CLIPTextWithProjectionConfig,
    CLIPTokenizer,
    ConvImageEncoder,
    TinyCLIP,
    bpe,
    bytes_to_unicode,
    causal_mask,
    clean_text,
    contrastive_loss,
    quick_gelu,
    sdxl_prompt_embeds,
)
from sdlearn.recipes.clip import clip_loss_fn, shapes_corpus, train_bpe, train_shapes_tokenizer, train_tiny_clip  # noqa: F401
