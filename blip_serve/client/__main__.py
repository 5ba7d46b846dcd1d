from blip_serve.client.cli import main

main()
