"""The hospital side: the Flower ClientApp that trains on a site's private images."""
