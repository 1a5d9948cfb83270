"""The Byzantine daemon (`byzps attack`): a cohort of colluding identities against a live server,
and the protocol-level attacks it can inject. The attack strategies themselves are tensor code in
byzps.common.attacks, shared with the simulator."""
