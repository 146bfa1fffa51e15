"""Privacy at the cut: defenses inside the step, the privacy budget, and attacks that measure leakage.

Defenses (`sljax.privacy.defenses`) plug into the protocol's hooks (`client_loss`,
`cut_gradient_transform`) and into the codecs, so they run inside the jitted round and unchanged in
deployment. Attacks (`sljax.privacy.attacks`) are pure functions over recorded messages
(`sljax.privacy.transcript`).
"""
