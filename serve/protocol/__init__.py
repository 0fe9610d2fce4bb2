"""The OpenAI wire protocol as the gateway and the load tests speak it: stream framing and classification."""
