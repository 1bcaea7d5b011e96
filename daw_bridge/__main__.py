from stemquery.daw_bridge.cli import main

main()
