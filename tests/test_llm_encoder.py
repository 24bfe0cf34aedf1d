"""LLM text encoders and Flux.2's export wrappers against diffusers' own code (no server): the
chat-template tokenizing, the stacked hidden states, the transformer's packing and ids, the
VAE's de-normalisation, the empirical mu, and the refusals of bad folders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from llm_folders import KLEIN_LAYERS, _flux2_vae, _qwen3, qwen_tokenizer

from export.specs import (
    Flux2TransformerSpec,
    Flux2VAEDecoderSpec,
    LLMEncoderSpec,
    UnsupportedModelError,
)
from models.pipeline_spec import CHAT_TEMPLATE
from models.prompt_tokens import check_template, tokenize
from runtime.families.flux2 import empirical_mu

TOKENS = 48


@pytest.fixture(scope="module")
def qwen3():
    return _qwen3(0, layers=28, hidden_size=16)


def test_chat_template_tokens_and_stacked_states_are_kleins(qwen3):
    from diffusers import Flux2KleinPipeline

    tokenizer = qwen_tokenizer()
    prompts = ["a red fox in the snow", ""]
    spec = LLMEncoderSpec.from_model(qwen3, sequence_length=TOKENS, layers=KLEIN_LAYERS)
    tokens = tokenize(tokenizer, prompts, TOKENS, CHAT_TEMPLATE)
    with torch.no_grad():
        ours = spec.wrap(qwen3)(torch.from_numpy(tokens.input_ids),
                                torch.from_numpy(tokens.attention_mask))
        theirs = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            qwen3, tokenizer, prompts, max_sequence_length=TOKENS,
            hidden_states_layers=KLEIN_LAYERS)
    assert ours.shape == (2, TOKENS, 3 * 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert tokens.attention_mask[1].sum() < tokens.attention_mask[0].sum()
    without_template = tokenize(tokenizer, prompts, TOKENS)
    assert not np.array_equal(without_template.input_ids, tokens.input_ids)


def test_truncation_is_counted(qwen3):
    tokens = tokenize(qwen_tokenizer(), ["a red fox " * 40], TOKENS, CHAT_TEMPLATE)
    assert tokens.dropped[0] > 0 and tokens.attention_mask.sum() == TOKENS


def test_layers_beyond_the_encoders_depth_are_refused(qwen3):
    with pytest.raises(UnsupportedModelError, match=r"text_encoder \(Qwen3ForCausalLM\).*"
                                                    r"layers 40 do not exist.*28 layers"):
        LLMEncoderSpec.from_model(qwen3, layers=(9, 18, 40))


def test_a_tokenizer_without_chat_template_is_refused():
    with pytest.raises(ValueError, match="tokenizer_x: the tokenizer has no chat template"):
        check_template(qwen_tokenizer(chat_template=False), CHAT_TEMPLATE, "tokenizer_x")
    with pytest.raises(ValueError, match="exactly one"):
        check_template(qwen_tokenizer(), "no placeholder", "tokenizer_x")


def test_transformer_wrapper_is_the_pipelines_call():
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False).eval()
    sample = torch.randn(2, 16, 4, 6)
    states = torch.randn(2, 10, 24)
    t = torch.tensor([700.0, 700.0])
    spec = Flux2TransformerSpec.from_model(transformer, sequence_length=10)
    with torch.no_grad():
        ours = spec.wrap(transformer)(sample, t, states)
        ids = Flux2KleinPipeline._prepare_latent_ids(sample)
        theirs = transformer(
            hidden_states=Flux2KleinPipeline._pack_latents(sample), timestep=t / 1000,
            encoder_hidden_states=states, txt_ids=Flux2KleinPipeline._prepare_text_ids(states),
            img_ids=ids, guidance=None, return_dict=False)[0]
        theirs = Flux2KleinPipeline._unpack_latents_with_ids(theirs, ids, 4, 6)
    torch.testing.assert_close(ours, theirs)


def test_vae_decoder_denormalises_and_unpatchifies():
    from diffusers import Flux2KleinPipeline

    vae = _flux2_vae(0)
    latent = torch.randn(1, 16, 4, 6)
    spec = Flux2VAEDecoderSpec.from_model(vae)
    with torch.no_grad():
        ours = spec.wrap(vae)(latent)
        std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, -1, 1, 1)
        plain = Flux2KleinPipeline._unpatchify_latents(
            latent * std + vae.bn.running_mean.view(1, -1, 1, 1))
        theirs = vae.decode(plain, return_dict=False)[0]
    assert spec.vae_scale_factor == 16 and ours.shape == (1, 3, 64, 96)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("tokens, steps", [(24, 4), (4096, 50), (5000, 28)])
def test_empirical_mu_is_the_pipelines(tokens, steps):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    assert empirical_mu(tokens, steps) == pytest.approx(compute_empirical_mu(tokens, steps))


def test_flux2_dev_encoder_path_is_flux2_pipelines():
    """Flux.2 dev's Mistral3: the system-message format string fixed at export, tokenized with
    the BOS the template holds and no other, gives Flux2Pipeline's stacked states of layers
    10, 20 and 30 (with the tokenizer in the place of the processor, which needs torchvision)."""
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from llm_folders import DEV_LAYERS, mistral3, mistral_tokenizer

    from models.prompt_tokens import system_template

    tokenizer, encoder = mistral_tokenizer(), mistral3()
    prompts = ["a red fox in the snow", ""]
    template = system_template(tokenizer, SYSTEM_MESSAGE)
    tokens = tokenize(tokenizer, prompts, TOKENS * 4, template)
    spec = LLMEncoderSpec.from_model(encoder, sequence_length=TOKENS * 4, layers=DEV_LAYERS)
    with torch.no_grad():
        ours = spec.wrap(encoder)(torch.from_numpy(tokens.input_ids),
                                  torch.from_numpy(tokens.attention_mask))
        theirs = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            encoder, tokenizer, prompts, max_sequence_length=TOKENS * 4,
            hidden_states_layers=DEV_LAYERS)
    assert (tokens.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert tokens.input_ids[0, 1] != tokenizer.bos_token_id
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_klein_folders_without_chat_template_or_tokenizer_are_refused(tmp_path):
    """Export (and so `serve --model`) refuses a Klein folder whose tokenizer lacks its chat
    template or its files, naming the component."""
    import shutil

    from llm_folders import flux2_klein_folder

    from export.presets import ModelSourceError, load_bundle, pipeline_spec

    folder = flux2_klein_folder(tmp_path / "klein")
    assert pipeline_spec(load_bundle(str(folder))).text_encoders[0].template == CHAT_TEMPLATE
    (folder / "tokenizer" / "chat_template.jinja").unlink()
    with pytest.raises(ModelSourceError, match="klein: tokenizer: the tokenizer has no chat "
                                               "template"):
        pipeline_spec(load_bundle(str(folder)))
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    with pytest.raises(ModelSourceError, match="text_encoder needs its tokenizer in tokenizer/"):
        pipeline_spec(load_bundle(str(folder)))


class _Encoders:
    """Records the texts a family encodes; states [N, 4, 2] of each text's length."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def texts(self, encoder, texts: list[str]) -> dict[str, np.ndarray]:
        self.seen += texts
        states = np.stack([np.full((4, 2), len(text), np.float32) for text in texts])
        return {"text_embeddings": states, "attention_mask": np.ones((len(texts), 4), np.int64)}


@pytest.mark.parametrize("distilled, guidance, negative, rows", [
    (False, 4.0, None, ["fox", ""]),  # Flux2KleinPipeline's empty negative
    (False, 4.0, "blur", ["fox", "blur"]),  # NEGATIVE_PROMPT in its place
    (False, 1.0, "blur", ["fox"]),  # guidance <= 1: no CFG
    (True, 4.0, "blur", ["fox"]),  # is_distilled: no CFG
])
def test_klein_guidance_rules(distilled, guidance, negative, rows):
    import asyncio

    from models.pipeline_spec import FLUX2, PipelineSpec, TextEncoder
    from runtime.families import family_of
    from runtime.request import ResolvedRequest

    spec = PipelineSpec("klein", FLUX2, 16, (4, 6), {}, text_encoders=(TextEncoder(
        "text_encoder", "tokenizer", "Qwen3ForCausalLM", layers=KLEIN_LAYERS,
        template=CHAT_TEMPLATE),), cfg_distilled=distilled)
    request = ResolvedRequest("fox", negative, None, None, 0, 4, "sequential", 1, guidance,
                              "default", height=64, width=96)
    encoders = _Encoders()
    conditioning = asyncio.run(family_of(spec).conditioning(encoders, request, spec))
    assert encoders.seen == rows
    assert (conditioning.uncond is None) == (len(rows) == 1)


def test_dev_prompts_lose_the_image_token_as_flux2_pipeline_drops_it():
    """Flux2Pipeline's format_input removes "[IMG]" from dev's prompts before its processor;
    Klein's pipeline keeps it."""
    import asyncio

    from models.pipeline_spec import FLUX2, PipelineSpec, TextEncoder
    from runtime.families import family_of
    from runtime.request import ResolvedRequest

    request = ResolvedRequest("a [IMG] fox", None, None, None, 0, 4, "sequential", 1, 4.0,
                              "default", height=64, width=96)
    seen = {}
    for kind, guidance_embeds in (("Mistral3ForConditionalGeneration", True),
                                  ("Qwen3ForCausalLM", False)):
        spec = PipelineSpec("flux2", FLUX2, 16, (4, 6), {}, guidance_embeds=guidance_embeds,
                            text_encoders=(TextEncoder("text_encoder", "tokenizer", kind),))
        encoders = _Encoders()
        asyncio.run(family_of(spec).conditioning(encoders, request, spec))
        seen[kind] = encoders.seen
    assert seen["Mistral3ForConditionalGeneration"] == ["a  fox"]
    assert seen["Qwen3ForCausalLM"] == ["a [IMG] fox", ""]
