"""What a real federation is made of, shared by the coordinator (`server.deploy`) and the hospitals (`client.node`)."""
