from mdm_circuits.cli.main import main

main()
