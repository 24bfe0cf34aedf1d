"""Pins the sampler's exact outputs (sha256 of the final latents) so refactors stay bit-identical.

The hashes were recorded with the sampler as it stood before its rewrite into functions; a
change of any hash is a change of behaviour, not of style. They depend on the installed torch
and diffusers builds: if those change, re-record with `pinned_run` and say why in the commit.
"""
from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from bench.methods import Setup, mixture_model, run_first_round_floor
from models.closed_form import GaussianMixtureModel
from runtime.driffusion import sample

SHAPE = (2, 1, 4, 4)
STEPS = 10
WINDOW = 3
VP_CONFIG = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**VP_CONFIG, clip_sample=False),
    "ddpm": lambda: DDPMScheduler(**VP_CONFIG, clip_sample=False),
    "dpmpp2m": lambda: DPMSolverMultistepScheduler(**VP_CONFIG),
    "dpmpp2m-v": lambda: DPMSolverMultistepScheduler(**VP_CONFIG, prediction_type="v_prediction"),
    "unipc": lambda: UniPCMultistepScheduler(**VP_CONFIG),
    "euler_a": lambda: EulerAncestralDiscreteScheduler(**VP_CONFIG),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
}
STOCHASTIC = ("ddpm", "euler_a")


def pinned_run(kind: str, mode: str, order: int, dtype: torch.dtype) -> tuple[str, str]:
    """sha256 of the final latents, and of every round's model inputs and the progress reports.

    The second hash also covers drafts whose outputs verified mode discards.
    """
    scheduler = SCHEDULERS[kind]()
    scheduler.set_timesteps(STEPS)
    if kind == "flow":
        model = GaussianMixtureModel.gaussian(0.3, 0.5, SHAPE[1:], prediction_type="flow")
    else:
        model = GaussianMixtureModel.gaussian(
            0.3, 0.5, SHAPE[1:], alphas_cumprod=scheduler.alphas_cumprod,
            prediction_type=scheduler.config.prediction_type,
        )
    trace = hashlib.sha256()

    async def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        trace.update(x.numpy().tobytes() + t.numpy().tobytes())
        return model(x, t)

    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    latents = latents * float(getattr(scheduler, "init_noise_sigma", 1.0))
    generator = torch.Generator().manual_seed(7) if kind in STOCHASTIC else None
    progress: list[int] = []
    result = asyncio.run(
        sample(
            denoise, scheduler, latents, mode=mode, window=WINDOW, generator=generator,
            draft_order=order, tolerance=0.05 if mode == "verified" else None,
            progress=progress.append,
        )
    )
    assert result.dtype == dtype
    trace.update(repr(progress).encode())
    return hashlib.sha256(result.numpy().tobytes()).hexdigest(), trace.hexdigest()


# (scheduler, mode, draft_order, latent dtype): (final latents, trace), as sha256
PINNED = {
    ("ddim", "sequential", 1, "float32"): (
        "4027a917fcd921d0f7bb4d5fb39e4db36eba88db631a769a98a9c4729aecf69a",
        "b15fb79e4728d59143423f2624be723374d496843f3752b05205df437c9318af",
    ),
    ("ddim", "aggressive", 1, "float32"): (
        "b37d7b3cbd411878c605fc26ce794bd6f93fee05fe47cd4da3b93368cc097b6b",
        "8bdfe76d2c455ae0786e44c92d4205d9151e920f88fde5c82c1034f5c6e22e10",
    ),
    ("ddim", "aggressive", 2, "float32"): (
        "29c6e8e34fb13dd18d6c84c0cc15a15bfc1b08ef7954538dfa7cc6c0579141ed",
        "ef1219c7723937474eed3186037cd9fbf0e8dc73ebbaaf53671ea3072cdc4a82",
    ),
    ("ddim", "conservative", 1, "float32"): (
        "792e2c606a28590e3f408970b21727d0d3a67220a2f75b37b5b96067028053e3",
        "87d12d3ec177fe178f4b2c573db98d96a16678dda296cd7aa098e1c26a99f52d",
    ),
    ("ddim", "conservative", 2, "float32"): (
        "c9d259183334aea2379de4743db0f679de6b343b13607649b2bd227fa0fdc20d",
        "ec3f217606cc64aa5251b265648f7f87d6c9afa705377f98698afed37af43651",
    ),
    ("ddim", "verified", 1, "float32"): (
        "36a345d8a97b4958803c358abc8493592908c3bb6dd974ef025826271630d10d",
        "6104c282b76b26357c36ec8f5e9f7a3873dcbc37875af34d730e4724b446baa5",
    ),
    ("ddim", "verified", 2, "float32"): (
        "307db04337e36d7e33c39f48680ee04609d0c309c7e00b61cecbd1460a814abf",
        "b24e028970a9296b620d8393ba295ca559141b58adfa17fec1dd314ab5effdf6",
    ),
    ("dpmpp2m", "sequential", 1, "float32"): (
        "ebab4032f60dbeac14f609cb84bc7a67030bf65a9a00e040060a9065dd4d9a52",
        "6907a0ad99680d4912d1efaf3c1e8807c603652fb1b50cd7a1d68671b1e8420d",
    ),
    ("dpmpp2m", "aggressive", 1, "float32"): (
        "b3992cde9a7b34aa943452e6f3751ab4f0633cf6619cca9227b6e3c03b4fd955",
        "39305de51b1b210c4cfd8dafbde91bba1f2bc96fc8a644f2efa46597823520fb",
    ),
    ("dpmpp2m", "aggressive", 2, "float32"): (
        "093ecd0dafccb67265565a35e337b1a987164d04ece295432693b764781c3e5b",
        "36a27576412ef3c1d82a41a4c290c36e759c97d07b9d2a4a6d138193754e0720",
    ),
    ("dpmpp2m", "conservative", 1, "float32"): (
        "747016907fe4aaa6490e7ad6b2521ebbb258d6458c490a8d685d2c3ba27a6e55",
        "a886d07f36bb0f1c9725365af7a5cf2b07820b56b79f126a8890c36abd6b1a0b",
    ),
    ("dpmpp2m", "conservative", 2, "float32"): (
        "2d3b3188b0452a6041ebd0c4b355e64391f34016cd2fd583c7b5225b9bab2434",
        "72f21f7f4d542fe6343ab60c76c8c55bd21becd143b43d8837889da35337efc4",
    ),
    ("dpmpp2m", "verified", 1, "float32"): (
        "b28ffe38c8e219fbbfe36b1c264b534487806a8f784cd7e5ace621faeb4dd724",
        "b507c063d39a8095d5d7a9e171f547aacfe5ce93ca0853850aa33d6d6daafc85",
    ),
    ("dpmpp2m", "verified", 2, "float32"): (
        "66efcea3aef2ae21647d926f7033c82c1945cabfe2b427f2db4815e5eccd654f",
        "b88f79ada063f86ea95f946d5ee44cd6319aacb6dd1618c760ddb9e783a85446",
    ),
    ("euler_a", "sequential", 1, "float32"): (
        "efef6a0dabb2e799dd2926e98334483699088b7d0eaf93d5b01115e8004d5eb2",
        "85cc155a8a4766838e116b31db8ecb24ea0aea3a6cbc032cf34e1e95d474676c",
    ),
    ("euler_a", "aggressive", 1, "float32"): (
        "e2a2d2248b41afb7015f19eed90c641885a9a923799f2ad6ba2fa497df9ec685",
        "a02e41860b5b447c5e30661ca86cd8f253958cf77f011361ab3c5ac6032d6cce",
    ),
    ("euler_a", "conservative", 1, "float32"): (
        "0b47eae9cc65b447a89cbe1a503c939786183fb8350ca2ba952b34055e28999d",
        "261f373b1ff874ee2d23a636dddf76c5c55e2c69b95b0e143ba1b63565a7c686",
    ),
    ("euler_a", "verified", 1, "float32"): (
        "efef6a0dabb2e799dd2926e98334483699088b7d0eaf93d5b01115e8004d5eb2",
        "fcba6e5208e31d2980ddd736a0f8bba745d293362c2d9ca5724d719e9df584a7",
    ),
    ("flow", "sequential", 1, "float32"): (
        "fdc1b80b873b8f033cc6c18db92484550bc39985bdb969280c6c86124de8af84",
        "095f23b6031752e9278f577b10e84612c7baee5096193245eeecd52b94a31684",
    ),
    ("flow", "aggressive", 1, "float32"): (
        "0f006915cc7696ad4430acaa664ac95f4bfa987e9eecee3b2bcb0ff3a176df47",
        "a123e2965172f17030643d57432cc7ec0ba3c2cdd2c1a800eef25e2b7ed8f04d",
    ),
    ("flow", "conservative", 1, "float32"): (
        "da36af58076d93a255c1feaf31c7d9e1bb8cbc7d18b2544dfc509ab553ce818c",
        "1ae514fd18f9bb706d6ea8f3115738d106c1b0c878da02d0e7337d74a5e32fcb",
    ),
    ("flow", "verified", 1, "float32"): (
        "907d695fa75c48a912d89470ba687faf96fea70fce02e9fa7c0d0eac8fce8186",
        "131d47f34b52a821c3ccfe60b37ef49ce4b2993db0663a378cef45af68869f2e",
    ),
    ("ddpm", "aggressive", 2, "float32"): (
        "ef75d641179159613269d7e14ee3392926082b2d30648c5e72c494c62414349e",
        "f035f8966cde03bc3bdfb50734ccec0f037f05dd7d0cb2e0a80dbbe03695156d",
    ),
    ("ddpm", "conservative", 2, "float32"): (
        "fb35aec89f0379748149eacb14fae983048b356001d75c00fe1fd5cb2f379532",
        "496922469886e8f7a61f48f3c1ab51915533c5ddeae07b64e9f942c5f89cedff",
    ),
    ("ddpm", "verified", 2, "float32"): (
        "4f755450ef2c6d7098c608e1ec89f12ca2d9e4ab4e848d6842ba4d6405b584e2",
        "4612d254f14e77089066a8abee535395082bcbe7bb3480c92e7805996a18ef73",
    ),
    ("unipc", "conservative", 2, "float32"): (
        "b89c825b45f752593ff8a7d6f2509c5c1f3d8b4aed506ede0828c0474e85d964",
        "9130759e660a9e0ffe15e37256cc00ab3b9ad3ddf8feca9153991058d265f5ce",
    ),
    ("unipc", "aggressive", 2, "float32"): (
        "9f8fdd5588cd8043e97dbd1b10379898fc75d049e16764e58431e4e26d0b48a5",
        "229f0a9fef456b3387df158ab27becae77194e5c51bf1b1822f3f6a84686afa2",
    ),
    ("dpmpp2m-v", "conservative", 2, "float32"): (
        "a63a9bcb82f173744c45a7a802ea48213253ad36d9778c87b56d4221afa97d91",
        "3559c7646f000fe433e2c7c64727775608c05f11cb8d802c07b07d86f465de5d",
    ),
    ("dpmpp2m-v", "verified", 2, "float32"): (
        "0780d0800693fd73e4b651fb93355a45321bc3fa3a9ef47751ce60e36369ce4b",
        "f2a1a654089d54e7aa51cbd4ebb8bca7ab0d95e5bed1bdcec5081daba6cc310e",
    ),
    ("ddim", "aggressive", 2, "float64"): (
        "bcf3c0630fc4c1c58a31449bc205f2e40560030737c4a2da26ec80f26ac35e87",
        "1ee369f765865e168af22b24e1eafa10ce5301dc01cec0d4072825020d58c342",
    ),
    ("dpmpp2m", "conservative", 2, "float64"): (
        "da91247371dfce04dbbcd429791a2eae8e89c49ed8897c156c8c90f3388071e8",
        "dbff44e7df5cec5300c8f2af19becc3a66694b5bab482557b69e60909ac5e139",
    ),
    ("euler_a", "conservative", 1, "float64"): (
        "cfb6a8df1103725496d4cdb1524b961536996bf4a4e7495b4a8126cfe6ac7d11",
        "aa7e0f8a958caf0ee6b9caf46defbbfaa737fd5e968cb8ef19bd2f21b07579c1",
    ),

}
ORACLE_HASH = "2eed4f6e3277063476b7088f02823dbd739fbc1fe1cb8b5b81ee8b97b93e2413"


@pytest.mark.parametrize("case", sorted(PINNED), ids=lambda case: "-".join(map(str, case)))
def test_final_latents_are_bit_identical_to_the_pinned_run(case):
    kind, mode, order, dtype = case
    assert pinned_run(kind, mode, order, getattr(torch, dtype)) == PINNED[case]


def test_the_first_round_floor_oracle_is_bit_identical_to_the_pinned_run():
    setup = Setup(window=WINDOW, batch=4)
    result, calls = run_first_round_floor(mixture_model(setup), setup, "dpmpp2m", STEPS)
    assert (calls.rounds, calls.evaluations) == (4, STEPS)
    assert hashlib.sha256(result.numpy().tobytes()).hexdigest() == ORACLE_HASH

